//! The log's file format: round trips, torn tails dropped, mid-file corruption refused.

use super::*;

fn put(key: &str, value: &[u8]) -> Op {
    Op::Put { key: key.into(), value: value.to_vec(), lease: 0 }
}

fn sample() -> Vec<Record> {
    vec![
        Record::Base { revision: 1 },
        Record::Entry { key: "/w/a".into(), value: b"1".to_vec(), create_revision: 1, mod_revision: 1, lease: 0 },
        Record::Batch { revision: 2, ops: vec![put("/w/b", b"two"), Op::Delete { key: "/w/a".into() }] },
        Record::Batch { revision: 3, ops: vec![Op::Put { key: "/w/n".into(), value: vec![], lease: 42 }] },
    ]
}

fn file_of(records: &[Record]) -> Vec<u8> {
    let mut data = MAGIC.to_vec();
    for r in records {
        data.extend_from_slice(&encode(r));
    }
    data
}

#[test]
fn records_round_trip() {
    let records = sample();
    let data = file_of(&records);
    let r = replay(&data).unwrap();
    assert_eq!(r.records, records);
    assert_eq!(r.valid_len, data.len() as u64);
    assert!(!r.torn_tail);
}

#[test]
fn every_torn_last_record_is_dropped() {
    let records = sample();
    let whole = file_of(&records);
    let before_last = file_of(&records[..3]).len();
    // Cut the last record at every possible byte.
    for cut in before_last..whole.len() {
        let r = replay(&whole[..cut]).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        assert_eq!(r.records, records[..3], "cut at {cut}");
        assert_eq!(r.valid_len, before_last as u64);
        assert_eq!(r.torn_tail, cut > before_last);
    }
}

#[test]
fn a_garbled_or_zero_filled_tail_is_dropped() {
    let records = sample();
    let mut data = file_of(&records);
    let good = data.len();
    // A file system may leave zeros after a crash.
    data.extend_from_slice(&[0u8; 100]);
    let r = replay(&data).unwrap();
    assert_eq!(r.records, records);
    assert_eq!(r.valid_len, good as u64);
    assert!(r.torn_tail);

    // The last record's checksum does not match (a partly written sector).
    let mut data = file_of(&records);
    let n = data.len();
    data[n - 1] ^= 0xff;
    let r = replay(&data).unwrap();
    assert_eq!(r.records, records[..3]);
    assert!(r.torn_tail);
}

#[test]
fn corruption_before_good_records_is_refused() {
    let records = sample();
    let mut data = file_of(&records);
    // Flip a byte inside the second record's payload: good records follow, so this is not a torn write.
    let offset = file_of(&records[..1]).len() + 10;
    data[offset] ^= 0xff;
    match replay(&data) {
        Err(StoreError::Corrupt(msg)) => assert!(msg.contains("offset"), "{msg}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn a_foreign_file_is_refused() {
    assert!(matches!(replay(b"not a log at all"), Err(StoreError::Corrupt(_))));
    assert!(matches!(replay(b""), Err(StoreError::Corrupt(_))));
}

#[test]
fn writer_appends_and_rewrites_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = LogWriter::create(dir.path(), &[Record::Base { revision: 1 }]).unwrap();
    w.append_batch(2, &[put("/w/x", b"1")]).unwrap();
    w.append_batch(3, &[put("/w/y", b"2")]).unwrap();
    let (r, _) = open_existing(dir.path()).unwrap().unwrap();
    assert_eq!(r.records.len(), 3);
    assert_eq!(r.valid_len, w.len());

    let snap = vec![
        Record::Base { revision: 3 },
        Record::Entry { key: "/w/x".into(), value: b"1".to_vec(), create_revision: 2, mod_revision: 2, lease: 0 },
    ];
    w.rewrite(&snap).unwrap();
    w.append_batch(4, &[Op::Delete { key: "/w/x".into() }]).unwrap();
    let (r, _) = open_existing(dir.path()).unwrap().unwrap();
    assert_eq!(r.records[..2], snap[..]);
    assert_eq!(r.records.len(), 3);
    assert!(!dir.path().join(TMP_FILE).exists());
}

#[test]
fn open_truncates_a_torn_tail_so_appends_continue_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = LogWriter::create(dir.path(), &[Record::Base { revision: 1 }]).unwrap();
    w.append_batch(2, &[put("/w/x", b"1")]).unwrap();
    let good = w.len();
    drop(w);
    // A crash in the middle of the next append.
    let torn = {
        let mut p = Vec::new();
        encode_batch(&mut p, 3, &[put("/w/y", b"lost")]);
        frame(&p)
    };
    let path = dir.path().join(LOG_FILE);
    let mut data = std::fs::read(&path).unwrap();
    data.extend_from_slice(&torn[..torn.len() / 2]);
    std::fs::write(&path, &data).unwrap();

    let (r, file) = open_existing(dir.path()).unwrap().unwrap();
    assert!(r.torn_tail);
    assert_eq!(r.valid_len, good);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), good);
    let mut w = LogWriter::new(dir.path(), file, r.valid_len);
    w.append_batch(3, &[put("/w/z", b"kept")]).unwrap();
    let (r, _) = open_existing(dir.path()).unwrap().unwrap();
    assert!(!r.torn_tail);
    assert_eq!(r.records.last(), Some(&Record::Batch { revision: 3, ops: vec![put("/w/z", b"kept")] }));
}
