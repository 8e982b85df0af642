//! `<repoKey>/<name>:<tag>` or `<repoKey>/<name>@<digest>`: an image as a node serves it.

use std::fmt;
use std::str::FromStr;

use wharf_core::{NameError, Reference, RepoError, RepoKey, validate_name};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub key: RepoKey,
    pub name: String,
    pub reference: Reference,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageRefError {
    #[error("{0:?} is not <repoKey>/<name>:<tag> or <repoKey>/<name>@<digest>")]
    Shape(String),
    #[error(transparent)]
    Key(#[from] RepoError),
    #[error(transparent)]
    Name(#[from] NameError),
}

impl FromStr for ImageRef {
    type Err = ImageRefError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shape = || ImageRefError::Shape(s.chars().take(200).collect());
        let (key, rest) = s.split_once('/').ok_or_else(shape)?;
        let key: RepoKey = key.parse()?;
        let (name, reference) = if let Some((name, digest)) = rest.split_once('@') {
            (name, digest)
        } else {
            // The tag follows the last ':' after the last '/'.
            let slash = rest.rfind('/').map_or(0, |i| i + 1);
            let colon = rest[slash..].rfind(':').map(|i| i + slash).ok_or_else(shape)?;
            (&rest[..colon], &rest[colon + 1..])
        };
        validate_name(name)?;
        let reference = Reference::parse(reference)?;
        Ok(ImageRef { key, name: name.to_owned(), reference })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reference {
            Reference::Tag(t) => write!(f, "{}/{}:{t}", self.key, self.name),
            Reference::Digest(d) => write!(f, "{}/{}@{d}", self.key, self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tags_and_digests() {
        let r: ImageRef = "ghcr/org/image:v1".parse().expect("valid");
        assert_eq!((r.key.as_str(), r.name.as_str()), ("ghcr", "org/image"));
        assert_eq!(r.reference, Reference::Tag("v1".into()));
        assert_eq!(r.to_string(), "ghcr/org/image:v1");
        let d = format!("sha256:{}", "a".repeat(64));
        let r: ImageRef = format!("lab/app@{d}").parse().expect("valid");
        assert_eq!(r.name, "app");
        assert_eq!(r.to_string(), format!("lab/app@{d}"));
    }

    #[test]
    fn refuses_bad_references() {
        for bad in ["ghcr", "ghcr/app", "Bad_Key/app:v1", "ghcr/App:v1", "ghcr/app:", "ghcr/app@sha256:zz", ":v1"] {
            assert!(bad.parse::<ImageRef>().is_err(), "{bad} should be refused");
        }
    }
}
