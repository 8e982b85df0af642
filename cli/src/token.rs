//! `regctl token create|list|revoke`: API tokens through `TokenService`. A new token is printed
//! once (the control plane keeps only its hash).

use std::time::SystemTime;

use serde::Serialize;
use wharf_proto::v1 as pb;

use crate::args::{Global, Output, TokenCmd, TokenCreateArgs};
use crate::client::ControlPlane;
use crate::error::CliError;
use crate::output::{self, Table};

/// A token as `-o json|yaml` prints it.
#[derive(Serialize, Debug)]
pub struct TokenView {
    pub id: String,
    pub role: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub repos: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    pub created_at: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Only right after `token create`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl From<pb::Token> for TokenView {
    fn from(t: pb::Token) -> Self {
        TokenView {
            id: t.id,
            role: t.role,
            repos: t.repos,
            expires_at: t.expires_at.as_ref().map(|e| output::timestamp(Some(e))),
            created_at: output::timestamp(t.created_at.as_ref()),
            description: t.description,
            token: (!t.secret.is_empty()).then_some(t.secret),
        }
    }
}

#[derive(Serialize)]
struct TokenList {
    tokens: Vec<TokenView>,
}

pub async fn run(global: &Global, cmd: TokenCmd) -> Result<(), CliError> {
    let cp = ControlPlane::connect(global).await?;
    match cmd {
        TokenCmd::Create(a) => create(global, &cp, a).await,
        TokenCmd::List => {
            let tokens = cp.call("", cp.tokens().list_tokens(pb::ListTokensRequest {})).await?.tokens;
            let view = TokenList { tokens: tokens.into_iter().map(TokenView::from).collect() };
            output::emit(global.output, &view, || table(&view.tokens))
        }
        TokenCmd::Revoke { id } => {
            cp.call(&id, cp.tokens().revoke_token(pb::RevokeTokenRequest { id: id.clone() })).await.map_err(
                |e| match e {
                    CliError::RepoNotFound { .. } => {
                        CliError::Failed(format!("token {id} not found (regctl token list shows the tokens)"))
                    }
                    e => e,
                },
            )?;
            output::print(&format!("token {id} revoked: every node refuses it once it has the new configuration"))
        }
    }
}

async fn create(global: &Global, cp: &ControlPlane, a: TokenCreateArgs) -> Result<(), CliError> {
    let req = pb::CreateTokenRequest {
        role: a.role,
        repos: a.repos,
        expires_in: a.expires.map(|d| prost_types::Duration { seconds: d.as_secs() as i64, nanos: 0 }),
        description: a.description.unwrap_or_default(),
    };
    let created = cp.call("", cp.tokens().create_token(req)).await?;
    let view = TokenView::from(created);
    match global.output {
        Output::Table => {
            // The token alone on stdout (for `> file`), the rest on stderr.
            eprintln!(
                "token {} ({}) created{}; it is shown once: store it now",
                view.id,
                view.role,
                view.expires_at.as_deref().map(|e| format!(", expires {e}")).unwrap_or_default()
            );
            output::print(view.token.as_deref().unwrap_or_default())
        }
        format => output::emit(format, &view, String::new),
    }
}

fn table(tokens: &[TokenView]) -> String {
    let mut t = Table::new(&["ID", "ROLE", "REPOS", "EXPIRES", "CREATED", "DESCRIPTION"]);
    let now = output::timestamp(Some(&prost_types::Timestamp {
        seconds: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64),
        nanos: 0,
    }));
    for v in tokens {
        let expires = match &v.expires_at {
            Some(e) if *e < now => format!("{e} (expired)"),
            Some(e) => e.clone(),
            None => "never".into(),
        };
        let repos = if v.repos.is_empty() && v.role == "puller" { "*".into() } else { v.repos.join(",") };
        t.row(vec![v.id.clone(), v.role.clone(), repos, expires, v.created_at.clone(), v.description.clone()]);
    }
    t.render()
}
