//! The control plane's gRPC API (`wharf.v1.RepoService`, `NodeService`) against a real
//! `wharf-control`: the same mistakes as over REST give the right status code and a message naming
//! the field; CRUD; a stale `expected_revision` is FAILED_PRECONDITION and writes nothing; gRPC and
//! REST are one implementation (what one writes, the other reads).

use tonic::Code;
use wharf_proto::v1 as pb;
use wharf_proto::v1::node_service_client::NodeServiceClient;
use wharf_proto::v1::repo_service_client::RepoServiceClient;
use wharf_tests::control::{ControlPlane, Grpc, etag_revision, grpc, rest};

type Client = RepoServiceClient<Grpc>;

const UPSTREAM: &str = "http://127.0.0.1:1";

async fn client(cp: &ControlPlane) -> anyhow::Result<Client> {
    Ok(RepoServiceClient::new(grpc(&cp.url()).await?))
}

fn repo(key: &str, upstream: &str) -> pb::Repo {
    pb::Repo { key: key.into(), kind: "generic".into(), upstream: upstream.into(), ..Default::default() }
}

fn secs(s: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds: s, nanos: 0 })
}

/// Asserts that `r` failed with `code` and a message starting with `field:` (when given).
fn expect_status<T: std::fmt::Debug>(
    what: &str,
    r: Result<T, tonic::Status>,
    code: Code,
    field: Option<&str>,
) -> tonic::Status {
    let status = match r {
        Ok(v) => panic!("{what}: expected {code:?}, got OK {v:?}"),
        Err(s) => s,
    };
    assert_eq!(status.code(), code, "{what}: {status:?}");
    assert!(!status.message().is_empty(), "{what}: empty message");
    if let Some(f) = field {
        assert!(
            status.message().starts_with(&format!("{f}:")),
            "{what}: the message should name {f:?}: {:?}",
            status.message()
        );
    }
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_grpc_bad_input_gives_status_codes_and_messages() -> anyhow::Result<()> {
    let cp = ControlPlane::embedded()?;
    let mut c = client(&cp).await?;

    let r = c.create_repo(pb::CreateRepoRequest { repo: None }).await;
    expect_status("create without a repo", r, Code::InvalidArgument, Some("repo"));

    let cases: Vec<(&str, pb::Repo, &str)> = vec![
        ("uppercase key", repo("Lab", UPSTREAM), "key"),
        ("empty key", repo("", UPSTREAM), "key"),
        ("key with a slash", repo("a/b", UPSTREAM), "key"),
        ("key of 65 characters", repo(&"a".repeat(65), UPSTREAM), "key"),
        ("unknown kind", pb::Repo { kind: "nope".into(), ..repo("a", UPSTREAM) }, "kind"),
        ("ftp upstream", repo("a", "ftp://example.com"), "upstream"),
        ("upstream without a scheme", repo("a", "example.com"), "upstream"),
        ("generic without an upstream", repo("a", ""), "upstream"),
        ("tag_ttl over 30 days", pb::Repo { tag_ttl: secs(31 * 86400), ..repo("a", UPSTREAM) }, "tag_ttl"),
        ("negative tag_ttl", pb::Repo { tag_ttl: secs(-1), ..repo("a", UPSTREAM) }, "tag_ttl"),
        ("username without password", pb::Repo { username: "u".into(), ..repo("a", UPSTREAM) }, "password"),
        ("password without username", pb::Repo { password: "p".into(), ..repo("a", UPSTREAM) }, "username"),
    ];
    for (what, r, field) in cases {
        let res = c.create_repo(pb::CreateRepoRequest { repo: Some(r) }).await;
        expect_status(what, res, Code::InvalidArgument, Some(field));
    }
    let list = c.list_repos(pb::ListReposRequest {}).await?.into_inner();
    assert!(list.repos.is_empty(), "a refused create wrote something: {:?}", list.repos);

    // Duplicate, missing, invalid key on read.
    let lab = c.create_repo(pb::CreateRepoRequest { repo: Some(repo("lab", UPSTREAM)) }).await?.into_inner();
    let r = c.create_repo(pb::CreateRepoRequest { repo: Some(repo("lab", "http://other.example")) }).await;
    let s = expect_status("duplicate create", r, Code::AlreadyExists, None);
    assert!(s.message().contains("lab"), "{s:?}");
    let r = c.get_repo(pb::GetRepoRequest { key: "missing".into() }).await;
    expect_status("get a missing repo", r, Code::NotFound, None);
    let r = c.get_repo(pb::GetRepoRequest { key: "No Such Key".into() }).await;
    expect_status("get an invalid key", r, Code::InvalidArgument, Some("key"));
    let r = c.update_repo(pb::UpdateRepoRequest { repo: Some(repo("missing", UPSTREAM)), ..Default::default() }).await;
    expect_status("update a missing repo", r, Code::NotFound, None);
    let r = c
        .update_repo(pb::UpdateRepoRequest { repo: None, expected_revision: lab.revision, clear_password: false })
        .await;
    expect_status("update without a repo", r, Code::InvalidArgument, Some("repo"));
    let r = c.delete_repo(pb::DeleteRepoRequest { key: "missing".into(), expected_revision: 0 }).await;
    expect_status("delete a missing repo", r, Code::NotFound, None);
    let r = c.delete_repo(pb::DeleteRepoRequest { key: "BAD".into(), expected_revision: 0 }).await;
    expect_status("delete an invalid key", r, Code::InvalidArgument, Some("key"));

    // Bad updates (with the right revision) are refused and write nothing.
    let bad_updates = [
        ("update with an ftp upstream", repo("lab", "ftp://x"), "upstream"),
        ("update with a 40-day TTL", pb::Repo { tag_ttl: secs(40 * 86400), ..repo("lab", UPSTREAM) }, "tag_ttl"),
        ("update with a username only", pb::Repo { username: "u".into(), ..repo("lab", UPSTREAM) }, "password"),
        ("update with an unknown kind", pb::Repo { kind: "zzz".into(), ..repo("lab", UPSTREAM) }, "kind"),
    ];
    for (what, r, field) in bad_updates {
        let res = c
            .update_repo(pb::UpdateRepoRequest {
                repo: Some(r),
                expected_revision: lab.revision,
                clear_password: false,
            })
            .await;
        expect_status(what, res, Code::InvalidArgument, Some(field));
    }

    // A stale expected_revision: FAILED_PRECONDITION (ABORTED is allowed too), nothing written.
    let updated = c
        .update_repo(pb::UpdateRepoRequest {
            repo: Some(repo("lab", "http://second.example")),
            expected_revision: lab.revision,
            clear_password: false,
        })
        .await?
        .into_inner();
    assert!(updated.revision > lab.revision);
    let before = c.get_repo(pb::GetRepoRequest { key: "lab".into() }).await?.into_inner();
    let r = c
        .update_repo(pb::UpdateRepoRequest {
            repo: Some(repo("lab", "http://stale.example")),
            expected_revision: lab.revision,
            clear_password: false,
        })
        .await;
    let s = match r {
        Ok(v) => panic!("stale update succeeded: {v:?}"),
        Err(s) => s,
    };
    assert!(matches!(s.code(), Code::FailedPrecondition | Code::Aborted), "stale update: {s:?}");
    assert!(s.message().contains(&lab.revision.to_string()), "the message should say which revision was sent: {s:?}");
    let r = c.delete_repo(pb::DeleteRepoRequest { key: "lab".into(), expected_revision: lab.revision }).await;
    let s = match r {
        Ok(v) => panic!("stale delete succeeded: {v:?}"),
        Err(s) => s,
    };
    assert!(matches!(s.code(), Code::FailedPrecondition | Code::Aborted), "stale delete: {s:?}");
    let now = c.get_repo(pb::GetRepoRequest { key: "lab".into() }).await?.into_inner();
    assert_eq!(now, before, "a refused write changed the repo");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_grpc_crud_and_one_implementation_with_rest() -> anyhow::Result<()> {
    let cp = ControlPlane::embedded()?;
    let mut c = client(&cp).await?;
    let secret = wharf_tests::random_name("grpc-s3cret-");

    let created = c
        .create_repo(pb::CreateRepoRequest {
            repo: Some(pb::Repo {
                tag_ttl: secs(600),
                username: "robot".into(),
                password: secret.clone(),
                ..repo("lab", "http://one.example")
            }),
        })
        .await?
        .into_inner();
    assert_eq!(created.key, "lab");
    assert_eq!(created.kind, "generic");
    assert_eq!(created.upstream, "http://one.example");
    assert_eq!(created.tag_ttl, secs(600));
    assert_eq!(created.username, "robot");
    assert!(created.password.is_empty(), "the password came back: {created:?}");
    assert!(created.password_set);
    assert!(created.revision > 0);
    assert!(created.created_at.is_some() && created.updated_at.is_some());

    let got = c.get_repo(pb::GetRepoRequest { key: "lab".into() }).await?.into_inner();
    assert_eq!(got.revision, created.revision);
    assert!(got.password.is_empty() && got.password_set, "{got:?}");
    assert_eq!(got.upstream, created.upstream);

    // What gRPC wrote, REST reads (same revision), and the other way round.
    let resp = rest("GET", &cp.api("/api/repos/lab"), &[], None).await?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(etag_revision(&resp)?, created.revision);
    assert_eq!(resp.json()?["tag_ttl"], "10m");
    let resp = rest(
        "POST",
        &cp.api("/api/repos"),
        &[("content-type", "application/json")],
        Some(br#"{"key":"viarest","kind":"ghcr"}"#),
    )
    .await?;
    assert_eq!(resp.status, 201, "{}", resp.text());
    let via_rest = c.get_repo(pb::GetRepoRequest { key: "viarest".into() }).await?.into_inner();
    assert_eq!(via_rest.revision, etag_revision(&resp)?);
    assert_eq!(via_rest.kind, "ghcr");
    assert_eq!(via_rest.upstream, "https://ghcr.io", "the kind's default upstream");

    let list = c.list_repos(pb::ListReposRequest {}).await?.into_inner();
    let keys: Vec<&str> = list.repos.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, ["lab", "viarest"]);
    assert!(list.revision >= via_rest.revision);
    assert!(list.repos.iter().all(|r| r.password.is_empty()), "list returned a password");

    // Update: compare-and-swap, an empty password keeps the stored one.
    let u1 = c
        .update_repo(pb::UpdateRepoRequest {
            repo: Some(pb::Repo { tag_ttl: secs(60), username: "robot".into(), ..repo("lab", "http://two.example") }),
            expected_revision: created.revision,
            clear_password: false,
        })
        .await?
        .into_inner();
    assert!(u1.revision > created.revision);
    assert_eq!(u1.upstream, "http://two.example");
    assert!(u1.password_set, "an update without a password dropped it");
    assert!(u1.password.is_empty());
    assert_eq!(u1.created_at, got.created_at, "an update changed created_at");
    // expected_revision 0: unconditional.
    let u2 = c
        .update_repo(pb::UpdateRepoRequest {
            repo: Some(repo("lab", "http://three.example")),
            expected_revision: 0,
            clear_password: true,
        })
        .await?
        .into_inner();
    assert!(u2.revision > u1.revision);
    assert!(!u2.password_set, "clear_password kept it: {u2:?}");
    assert!(u2.username.is_empty());

    // Delete with the right revision.
    let d =
        c.delete_repo(pb::DeleteRepoRequest { key: "lab".into(), expected_revision: u2.revision }).await?.into_inner();
    assert!(d.revision > u2.revision);
    let r = c.get_repo(pb::GetRepoRequest { key: "lab".into() }).await;
    expect_status("get after delete", r, Code::NotFound, None);
    let resp = rest("GET", &cp.api("/api/repos/lab"), &[], None).await?;
    assert_eq!(resp.status, 404);
    let d = c.delete_repo(pb::DeleteRepoRequest { key: "viarest".into(), expected_revision: 0 }).await?.into_inner();
    assert!(d.revision > 0);
    assert!(c.list_repos(pb::ListReposRequest {}).await?.into_inner().repos.is_empty());

    // NodeService answers (no node here).
    let mut nodes = NodeServiceClient::new(grpc(&cp.url()).await?);
    assert!(nodes.list_nodes(pb::ListNodesRequest {}).await?.into_inner().nodes.is_empty());

    assert!(!cp.all_output().contains(&secret), "the control plane logged the password");
    Ok(())
}

/// What Create and Update answer is what a Get reads back afterwards (timestamps included: a client
/// that compares them must not see `created_at` move).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_grpc_write_answers_match_what_is_read_back() -> anyhow::Result<()> {
    let cp = ControlPlane::embedded()?;
    let mut c = client(&cp).await?;
    let created = c.create_repo(pb::CreateRepoRequest { repo: Some(repo("lab", UPSTREAM)) }).await?.into_inner();
    let got = c.get_repo(pb::GetRepoRequest { key: "lab".into() }).await?.into_inner();
    assert_eq!(created, got, "CreateRepo's answer differs from GetRepo's");
    let updated = c
        .update_repo(pb::UpdateRepoRequest {
            repo: Some(repo("lab", "http://two.example")),
            expected_revision: created.revision,
            clear_password: false,
        })
        .await?
        .into_inner();
    let got = c.get_repo(pb::GetRepoRequest { key: "lab".into() }).await?.into_inner();
    assert_eq!(updated, got, "UpdateRepo's answer differs from GetRepo's");
    Ok(())
}
