//! The Prometheus text exposition format, parsed into a map for exact assertions: every sample is
//! keyed by its name and its labels sorted by name, `name{a="1",b="2"}` (`name` without labels).

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};

/// One scrape: sample key → value.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scrape {
    pub samples: BTreeMap<String, f64>,
}

/// The key of a sample: `name{k="v",...}` with labels sorted by name (values escaped as in the
/// exposition format), or `name` alone.
pub fn key(name: &str, labels: &[(&str, &str)]) -> String {
    let mut labels: Vec<(&str, &str)> = labels.to_vec();
    labels.sort();
    if labels.is_empty() {
        return name.to_owned();
    }
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
    format!("{name}{{{}}}", inner.join(","))
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Scrape {
    /// Parses the text format; comment lines (`# HELP`, `# TYPE`) and blank lines are skipped.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut samples = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, labels, value) = parse_line(line).with_context(|| format!("line {}: {line:?}", i + 1))?;
            let refs: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let k = key(&name, &refs);
            if samples.insert(k.clone(), value).is_some() {
                bail!("line {}: sample {k} appears twice", i + 1);
            }
        }
        Ok(Self { samples })
    }

    /// The value of the sample `name{labels}`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples.get(&key(name, labels)).copied()
    }

    /// Every sample of metric `name` (exactly that name: `x_bucket` is not part of `x`).
    pub fn family(&self, name: &str) -> BTreeMap<String, f64> {
        self.samples
            .iter()
            .filter(|(k, _)| k.as_str() == name || k.strip_prefix(name).is_some_and(|r| r.starts_with('{')))
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// The samples of `name` whose labels include every pair of `filter`.
    pub fn family_where(&self, name: &str, filter: &[(&str, &str)]) -> BTreeMap<String, f64> {
        let wanted: Vec<String> = filter.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
        self.family(name)
            .into_iter()
            .filter(|(k, _)| {
                let labels = k.split_once('{').map(|(_, l)| l.trim_end_matches('}')).unwrap_or("");
                wanted.iter().all(|w| split_labels(labels).iter().any(|l| l == w))
            })
            .collect()
    }

    /// The metric names present (sample names, so histograms appear as `_bucket`, `_sum`, `_count`).
    pub fn names(&self) -> std::collections::BTreeSet<String> {
        self.samples.keys().map(|k| k.split('{').next().unwrap_or(k).to_owned()).collect()
    }

    /// The sum of every sample of `name`.
    pub fn sum(&self, name: &str) -> f64 {
        self.family(name).values().sum()
    }
}

/// `k="v"` items of a rendered label set (split at commas outside quotes).
fn split_labels(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut cur, mut quoted, mut escaped) = (String::new(), false, false);
    for c in s.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

type Labels = Vec<(String, String)>;

fn parse_line(line: &str) -> anyhow::Result<(String, Labels, f64)> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace()).context("no value")?;
    let name = &line[..name_end];
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        bail!("bad metric name {name:?}");
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices().peekable();
        loop {
            // Label name up to '=' (or the closing brace).
            let mut lname = String::new();
            let mut closed = None;
            for (i, c) in chars.by_ref() {
                match c {
                    '}' => {
                        closed = Some(i);
                        break;
                    }
                    '=' => break,
                    ',' | ' ' => {}
                    c => lname.push(c),
                }
            }
            if let Some(i) = closed {
                rest = &r[i + 1..];
                break;
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                bail!("label {lname:?}: value not quoted");
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => bail!("unterminated escape"),
                    },
                    Some((_, '"')) => break,
                    Some((_, c)) => value.push(c),
                    None => bail!("unterminated label value"),
                }
            }
            labels.push((lname, value));
        }
    }
    let mut parts = rest.split_whitespace();
    let value = parts.next().context("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse::<f64>().with_context(|| format!("bad value {v:?}"))?,
    };
    Ok((name.to_owned(), labels, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_samples_with_sorted_labels() {
        let text = "# HELP x_total x\n# TYPE x_total counter\nx_total{b=\"2\",a=\"q\\\"x,y\"} 3\nup 1\nh_bucket{le=\"+Inf\"} 4\nh_sum 0.5\n";
        let s = Scrape::parse(text).expect("parses");
        assert_eq!(s.get("x_total", &[("a", "q\"x,y"), ("b", "2")]), Some(3.0));
        assert_eq!(s.get("up", &[]), Some(1.0));
        assert_eq!(s.get("h_bucket", &[("le", "+Inf")]), Some(4.0));
        assert_eq!(s.family("h").len(), 0);
        assert_eq!(s.family_where("x_total", &[("b", "2")]).len(), 1);
        assert_eq!(s.family_where("x_total", &[("a", "q\"x,y")]).len(), 1);
        assert_eq!(s.family_where("x_total", &[("b", "3")]).len(), 0);
        assert!(s.names().contains("h_sum"));
        assert!(Scrape::parse("x{a=\"1\" 2").is_err());
    }
}
