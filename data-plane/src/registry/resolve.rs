//! Which repo a request is for: the path's repoKey, else (as a mirror) `?ns=`, the `Host`
//! header, the default mirror. The token endpoint resolves each scope's name the same way.

use std::sync::Arc;

use http::{HeaderMap, header};
use wharf_core::{Repo, RepoKey, registry_host_error};

use super::path;
use crate::config::Snapshot;
use crate::error::RegistryError;
use crate::state::MirrorRouting;

/// The repo a request goes to, how it was chosen, and the name the client wrote for it.
pub struct Routed {
    pub repo: Arc<Repo>,
    pub name: String,
    pub route: &'static str,
}

/// Chooses the repo: the path's first segment when it is one of this node's repoKeys (except on a
/// mirror-only port), else as a mirror: by `?ns=` (containerd), by the `Host` header's first label
/// when it is a repoKey (`dockerhub.wharf.example`), else the default mirror (dockerd's
/// `registry-mirrors`, Docker Hub names).
pub fn resolve(
    snapshot: &Snapshot,
    mirror: &MirrorRouting,
    name: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Routed, RegistryError> {
    let keyed = path::keyed(name);
    if !mirror.only
        && let Some((key, name)) = &keyed
        && let Some(repo) = snapshot.repos.get(key)
    {
        return Ok(Routed { repo: repo.clone(), name: (*name).to_owned(), route: "key" });
    }
    let mirrored = |repo: &Arc<Repo>, route| Ok(Routed { repo: repo.clone(), name: name.to_owned(), route });
    if let Some(ns) = query.and_then(ns_param) {
        if let Some(why) = registry_host_error(&ns) {
            return Err(RegistryError::name_invalid(format!(
                "ns={:?} is not a registry host: {why}",
                path::truncate(&ns, 80)
            )));
        }
        return match snapshot.mirror_for(&ns) {
            Some(repo) => mirrored(repo, "ns"),
            None => Err(RegistryError::not_found(
                "NAME_UNKNOWN",
                format!("no repo on this node mirrors {ns} (a repo's mirror_of, or its kind's or upstream's host)"),
            )),
        };
    }
    if let Some(repo) = host_repo(snapshot, headers) {
        return mirrored(repo, "host");
    }
    match snapshot.default_mirror(mirror.default.as_ref()) {
        Ok(Some(repo)) => mirrored(repo, "default"),
        Ok(None) => {
            let first = match keyed {
                Some((key, _)) => format!(
                    "no repo {:?} is configured on this node; add a [[repo]] with key = {:?} to the node's config file (or create it through the control plane)",
                    key.as_str(),
                    key.as_str()
                ),
                None => format!("{:?} names no repo of this node", path::truncate(name, 80)),
            };
            Err(RegistryError::not_found(
                "NAME_UNKNOWN",
                format!(
                    "{first}; and there is no default mirror for names without a repoKey (a repo mirroring docker.io, or --default-mirror)"
                ),
            ))
        }
        Err(key) => Err(RegistryError::not_found(
            "NAME_UNKNOWN",
            format!("the node's default mirror {key} is not a repo here (--default-mirror or default_mirror)"),
        )),
    }
}

/// containerd's `ns` query parameter (the registry host an image reference names).
pub fn ns_param(query: &str) -> Option<String> {
    query.split('&').find_map(|kv| kv.strip_prefix("ns=")).map(str::to_owned)
}

/// The repo named by the `Host` header's first label (`<repoKey>.<domain>[:port]`).
fn host_repo<'a>(snapshot: &'a Snapshot, headers: &HeaderMap) -> Option<&'a Arc<Repo>> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let (first, rest) = host.split_once('.')?;
    if rest.is_empty() || host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    snapshot.repos.get(&first.parse::<RepoKey>().ok()?)
}
