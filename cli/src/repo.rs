//! `regctl repo ...`: repos through `RepoService`.

use std::io::{BufRead as _, IsTerminal as _, Read as _, Write as _};

use serde::Serialize;
use wharf_proto::v1 as pb;

use crate::args::{Global, PasswordSource, RepoAddArgs, RepoCmd, RepoUpdateArgs};
use crate::client::ControlPlane;
use crate::error::CliError;
use crate::output::{self, Table};

/// A repo as `-o json|yaml` prints it: the REST API's shape (the password is write-only).
#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct RepoView {
    pub key: String,
    pub kind: String,
    pub upstream: String,
    pub tag_ttl: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    pub password_set: bool,
    pub created_at: String,
    pub updated_at: String,
    pub revision: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_ttl: Option<String>,
    pub auth: String,
    pub access: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_tls_verify: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mirror_of: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_provider: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_file: Option<String>,
}

impl From<&pb::Repo> for RepoView {
    fn from(r: &pb::Repo) -> Self {
        RepoView {
            key: r.key.clone(),
            kind: r.kind.clone(),
            upstream: r.upstream.clone(),
            tag_ttl: output::duration(r.tag_ttl.as_ref()),
            username: (!r.username.is_empty()).then(|| r.username.clone()),
            password_set: r.password_set,
            created_at: output::timestamp(r.created_at.as_ref()),
            updated_at: output::timestamp(r.updated_at.as_ref()),
            revision: r.revision,
            cache_ttl: r.cache_ttl.as_ref().map(|d| output::duration(Some(d))),
            auth: if r.auth.is_empty() { "static".into() } else { r.auth.clone() },
            access: if r.access.is_empty() { "public".into() } else { r.access.clone() },
            ca_bundle: (!r.ca_bundle.is_empty()).then(|| r.ca_bundle.clone()),
            insecure_skip_tls_verify: r.insecure_skip_tls_verify,
            mirror_of: r.mirror_of.clone(),
            credential_provider: (!r.credential_provider.is_empty()).then(|| r.credential_provider.clone()),
            credential_file: (!r.credential_file.is_empty()).then(|| r.credential_file.clone()),
        }
    }
}

#[derive(Serialize)]
struct RepoList {
    repos: Vec<RepoView>,
    revision: i64,
}

pub async fn run(global: &Global, cmd: RepoCmd) -> Result<(), CliError> {
    // Everything that can fail locally is checked before connecting.
    match cmd {
        RepoCmd::Add(args) => {
            let password = read_password(&args.password)?;
            check_credentials(args.username.as_deref(), password.is_some())?;
            let cp = ControlPlane::connect(global).await?;
            add(global, &cp, args, password).await
        }
        RepoCmd::List => {
            let cp = ControlPlane::connect(global).await?;
            let list = cp.call("", cp.repos().list_repos(pb::ListReposRequest {})).await?;
            let view = RepoList { repos: list.repos.iter().map(RepoView::from).collect(), revision: list.revision };
            output::emit(global.output, &view, || list_table(&view.repos))
        }
        RepoCmd::Get { key } => {
            let cp = ControlPlane::connect(global).await?;
            let r = get(&cp, key.as_str()).await?;
            let view = RepoView::from(&r);
            output::emit(global.output, &view, || repo_fields(&view))
        }
        RepoCmd::Update(args) => {
            let password = read_password(&args.password)?;
            let cp = ControlPlane::connect(global).await?;
            update(global, &cp, args, password).await
        }
        RepoCmd::Rm { key, yes } => {
            let interactive = std::io::stdin().is_terminal() && std::io::stderr().is_terminal();
            if !yes && !interactive {
                return Err(CliError::Usage(format!(
                    "not deleting repo {key:?} without a confirmation: pass --yes (standard input is not a terminal)"
                )));
            }
            let cp = ControlPlane::connect(global).await?;
            rm(global, &cp, key.as_str(), yes).await
        }
    }
}

async fn get(cp: &ControlPlane, key: &str) -> Result<pb::Repo, CliError> {
    cp.call(key, cp.repos().get_repo(pb::GetRepoRequest { key: key.to_owned() })).await
}

async fn add(global: &Global, cp: &ControlPlane, a: RepoAddArgs, password: Option<String>) -> Result<(), CliError> {
    let key = a.key.to_string();
    let repo = pb::Repo {
        key: key.clone(),
        kind: a.kind.to_string(),
        upstream: a.upstream.unwrap_or_default(),
        tag_ttl: a.tag_ttl.map(proto_duration),
        username: a.username.unwrap_or_default(),
        password: password.unwrap_or_default(),
        cache_ttl: a.cache_ttl.map(proto_duration),
        auth: a.auth.unwrap_or_default(),
        access: a.access.unwrap_or_default(),
        ca_bundle: a.ca_bundle_file.as_deref().map(read_ca_bundle).transpose()?.unwrap_or_default(),
        insecure_skip_tls_verify: a.insecure_skip_tls_verify,
        mirror_of: a.mirror_of,
        credential_provider: a.credential_provider.unwrap_or_default(),
        credential_file: a.credential_file.unwrap_or_default(),
        ..Default::default()
    };
    let r = cp.call(&key, cp.repos().create_repo(pb::CreateRepoRequest { repo: Some(repo) })).await?;
    let view = RepoView::from(&r);
    output::emit(global.output, &view, || format!("repo {} added (revision {})\n", view.key, view.revision))
}

async fn update(
    global: &Global,
    cp: &ControlPlane,
    a: RepoUpdateArgs,
    password: Option<String>,
) -> Result<(), CliError> {
    let key = a.key.to_string();
    let mut repo = get(cp, &key).await?;
    let read_revision = repo.revision;
    if let Some(kind) = a.kind {
        repo.kind = kind.to_string();
    }
    if let Some(u) = a.upstream {
        repo.upstream = u;
    }
    if let Some(t) = a.tag_ttl {
        repo.tag_ttl = Some(proto_duration(t));
    }
    if let Some(t) = a.cache_ttl {
        repo.cache_ttl = Some(proto_duration(t));
    }
    if let Some(u) = a.username {
        repo.username = u;
    }
    if let Some(x) = a.auth {
        repo.auth = x;
    }
    if let Some(x) = a.access {
        repo.access = x;
    }
    if let Some(path) = &a.ca_bundle_file {
        repo.ca_bundle = read_ca_bundle(path)?;
    }
    if a.clear_ca_bundle {
        repo.ca_bundle.clear();
    }
    if let Some(x) = a.insecure_skip_tls_verify {
        repo.insecure_skip_tls_verify = x;
    }
    if let Some(hosts) = a.mirror_of {
        repo.mirror_of = hosts;
    }
    if a.default_mirror_of {
        repo.mirror_of.clear();
    }
    if let Some(p) = a.credential_provider {
        if p.is_empty() {
            repo.credential_file.clear();
        }
        repo.credential_provider = p;
    }
    if let Some(f) = a.credential_file {
        repo.credential_file = f;
    }
    if a.clear_credentials {
        repo.username.clear();
    }
    check_credentials(
        (!repo.username.is_empty()).then_some(repo.username.as_str()),
        password.is_some() || (repo.password_set && !a.clear_credentials),
    )?;
    repo.password = password.unwrap_or_default();
    // Output-only fields go back as the server sent them; it ignores them.
    let req = pb::UpdateRepoRequest {
        repo: Some(repo),
        expected_revision: a.revision.unwrap_or(read_revision),
        clear_password: a.clear_credentials,
    };
    let r = cp.call(&key, cp.repos().update_repo(req)).await?;
    let view = RepoView::from(&r);
    output::emit(global.output, &view, || format!("repo {} updated (revision {})\n", view.key, view.revision))
}

async fn rm(global: &Global, cp: &ControlPlane, key: &str, yes: bool) -> Result<(), CliError> {
    let repo = get(cp, key).await?;
    if !yes {
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "Delete repo {key} ({} {})? Nodes stop serving it. [y/N] ", repo.kind, repo.upstream);
        let _ = err.flush();
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer).map_err(|e| CliError::Input(e.to_string()))?;
        if !matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
            return Err(CliError::Failed(format!("repo {key} not deleted")));
        }
    }
    let req = pb::DeleteRepoRequest { key: key.to_owned(), expected_revision: repo.revision };
    let r = cp.call(key, cp.repos().delete_repo(req)).await?;
    #[derive(Serialize)]
    struct Deleted<'a> {
        key: &'a str,
        deleted: bool,
        revision: i64,
    }
    let d = Deleted { key, deleted: true, revision: r.revision };
    output::emit(global.output, &d, || format!("repo {key} deleted (revision {})\n", r.revision))
}

fn check_credentials(username: Option<&str>, has_password: bool) -> Result<(), CliError> {
    match (username, has_password) {
        (Some(_), false) => Err(CliError::Usage(
            "--username needs a password: --password-stdin, --password-env VAR or --password-file PATH".into(),
        )),
        (None, true) => Err(CliError::Usage("a password needs a --username".into())),
        _ => Ok(()),
    }
}

/// The password from stdin, an environment variable or a file; never from a flag's value.
fn read_password(src: &PasswordSource) -> Result<Option<String>, CliError> {
    let raw = if src.password_stdin {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| CliError::Input(format!("reading the password from standard input: {e}")))?;
        s
    } else if let Some(var) = &src.password_env {
        std::env::var(var).map_err(|_| CliError::Input(format!("environment variable {var} is not set")))?
    } else if let Some(path) = &src.password_file {
        std::fs::read_to_string(path).map_err(|source| CliError::ReadFile {
            what: "the password",
            path: path.clone(),
            source,
        })?
    } else {
        return Ok(None);
    };
    let p = raw.strip_suffix('\n').map(|p| p.strip_suffix('\r').unwrap_or(p)).unwrap_or(&raw);
    if p.is_empty() {
        return Err(CliError::Input("the password is empty".into()));
    }
    Ok(Some(p.to_owned()))
}

/// A CA bundle file's text (checked by the control plane).
fn read_ca_bundle(path: &std::path::Path) -> Result<String, CliError> {
    std::fs::read_to_string(path).map_err(|source| CliError::ReadFile {
        what: "the CA bundle",
        path: path.to_owned(),
        source,
    })
}

fn proto_duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

fn list_table(repos: &[RepoView]) -> String {
    if repos.is_empty() {
        return "no repos (add one with regctl repo add)\n".into();
    }
    let mut t =
        Table::new(&["KEY", "KIND", "UPSTREAM", "TAG TTL", "USERNAME", "PASSWORD", "AUTH", "ACCESS", "REVISION"]);
    for r in repos {
        t.row(vec![
            r.key.clone(),
            r.kind.clone(),
            r.upstream.clone(),
            r.tag_ttl.clone(),
            r.username.clone().unwrap_or_else(|| "-".into()),
            if r.password_set { "set" } else { "-" }.into(),
            r.auth.clone(),
            r.access.clone(),
            r.revision.to_string(),
        ]);
    }
    t.render()
}

fn repo_fields(r: &RepoView) -> String {
    output::fields(&[
        ("key", r.key.clone()),
        ("kind", r.kind.clone()),
        ("upstream", r.upstream.clone()),
        ("tag ttl", r.tag_ttl.clone()),
        ("username", r.username.clone().unwrap_or_else(|| "-".into())),
        ("password", if r.password_set { "set" } else { "-" }.into()),
        ("auth", r.auth.clone()),
        ("access", r.access.clone()),
        ("ca bundle", if r.ca_bundle.is_some() { "set" } else { "-" }.into()),
        ("credential provider", r.credential_provider.clone().unwrap_or_else(|| "-".into())),
        ("credential file", r.credential_file.clone().unwrap_or_else(|| "-".into())),
        ("created", r.created_at.clone()),
        ("updated", r.updated_at.clone()),
        ("revision", r.revision.to_string()),
    ])
}
