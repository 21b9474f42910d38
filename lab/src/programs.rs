//! Where the lab finds the programs it starts: the engine binary (`clonecluster`) on every
//! node, and the lab binary itself in the client namespace (its hidden `lab-probe` subcommand is
//! the connection probe).
//!
//! It owns only this lookup; it never builds anything and never searches `PATH`, so that a lab
//! run measures the engine that was built beside it, or the one it was told to use.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// The engine binary's file name.
pub const ENGINE_NAME: &str = "clonecluster";
/// The environment variable that names the engine binary (the `--engine` flag wins over it).
pub const ENGINE_ENV: &str = "CLONECLUSTER_ENGINE";

/// The programs a lab run starts.
#[derive(Debug, Clone)]
pub struct Programs {
    /// The engine (`clonecluster`), started with `run` on each node.
    pub engine: PathBuf,
    /// The program whose `lab-probe` subcommand is the connection probe (the lab binary).
    pub probe: PathBuf,
}

impl Programs {
    /// The engine from [`engine_binary`], and the running executable as the probe.
    pub fn for_this_binary(engine: Option<&Path>) -> anyhow::Result<Programs> {
        let probe = std::env::current_exe().context("cannot find the lab's own executable")?;
        Ok(Programs {
            engine: engine_binary(engine)?,
            probe,
        })
    }
}

/// The engine binary: `explicit` if given, else `$CLONECLUSTER_ENGINE`, else `clonecluster`
/// next to the running executable (`target/release/clonecluster` beside
/// `target/release/clonecluster-lab`). A test executable lives one level deeper, in
/// `target/<profile>/deps`; then the engine is looked for in `target/<profile>`.
pub fn engine_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return existing(p.to_owned(), "--engine");
    }
    if let Some(p) = std::env::var_os(ENGINE_ENV).filter(|p| !p.is_empty()) {
        return existing(PathBuf::from(p), ENGINE_ENV);
    }
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let mut tried = vec![dir.join(ENGINE_NAME)];
    if dir.file_name().is_some_and(|n| n == "deps") {
        if let Some(profile) = dir.parent() {
            tried.push(profile.join(ENGINE_NAME));
        }
    }
    if let Some(found) = tried.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let tried: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    bail!(
        "the engine binary `{ENGINE_NAME}` is not where the lab looks for it ({})\n  fix: build \
         it in the same target directory (`cargo build --release --locked -p clonecluster -p \
         clonecluster-lab`, or `cargo build --workspace --all-targets --locked` for the tests), \
         or name it with --engine PATH or {ENGINE_ENV}=PATH",
        tried.join(", ")
    )
}

fn existing(path: PathBuf, from: &str) -> anyhow::Result<PathBuf> {
    if !path.is_file() {
        bail!(
            "{from}: {}: no such file (it should be the engine binary, `{ENGINE_NAME}`)",
            path.display()
        );
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_named_engine_that_does_not_exist_is_a_clear_error() {
        let e = engine_binary(Some(Path::new("/nonexistent/clonecluster"))).unwrap_err();
        let text = format!("{e:#}");
        assert!(text.contains("--engine"), "{text}");
        assert!(text.contains("/nonexistent/clonecluster"), "{text}");
    }

    #[test]
    fn an_existing_file_is_taken_as_named() {
        let exe = std::env::current_exe().unwrap();
        assert_eq!(engine_binary(Some(&exe)).unwrap(), exe);
    }
}
