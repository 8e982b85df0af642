//! Records the git commit the binaries are built from, for `--version`: `$WHARF_GIT_COMMIT` when
//! set (a build from a source tarball or a container build without `.git`), else `git rev-parse`
//! for release builds. Debug builds do not ask git: watching the branch would rebuild every crate
//! after every commit.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=WHARF_GIT_COMMIT");
    let commit = std::env::var("WHARF_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| (std::env::var("PROFILE").as_deref() == Ok("release")).then(git_commit).flatten());
    let commit = commit.unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=WHARF_GIT_COMMIT={commit}");
}

/// The checked-out commit, and what to watch for it to change (HEAD and the branch it points to).
fn git_commit() -> Option<String> {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git").args(args).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    for path in ["HEAD", "packed-refs"] {
        if let Some(p) = git(&["rev-parse", "--path-format=absolute", "--git-path", path]) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"])
        && let Some(p) = git(&["rev-parse", "--path-format=absolute", "--git-path", &branch])
    {
        println!("cargo:rerun-if-changed={p}");
    }
    Some(commit)
}
