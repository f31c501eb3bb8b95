//! Shell completions and man pages, generated from the clap definition for packaging.

use std::{fs, path::Path};

use anyhow::Context as _;
use clap::CommandFactory as _;
use clap_complete::Shell;

use crate::cli::Cli;

/// Writes `completions/{bypass.bash,_bypass,bypass.fish}` and `man/bypass*.1` under `dir`.
pub fn generate(dir: &Path) -> anyhow::Result<()> {
    let completions = dir.join("completions");
    let man = dir.join("man");
    for path in [&completions, &man] {
        fs::create_dir_all(path).with_context(|| format!("cannot create {}", path.display()))?;
    }
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path = clap_complete::generate_to(shell, &mut Cli::command(), "bypass", &completions)
            .with_context(|| format!("cannot write the {shell} completions"))?;
        log::info!("wrote {}", path.display());
    }
    clap_mangen::generate_to(Cli::command(), &man)
        .with_context(|| format!("cannot write man pages to {}", man.display()))?;
    log::info!("wrote man pages to {}", man.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_completions_and_man_pages() {
        let dir = std::env::temp_dir().join(format!("bypass-generate-{}", std::process::id()));
        generate(&dir).expect("generate");
        for file in [
            "completions/bypass.bash",
            "completions/_bypass",
            "completions/bypass.fish",
        ] {
            assert!(dir.join(file).is_file(), "{file} missing");
        }
        let attach = fs::read_to_string(dir.join("man/bypass-attach.1")).expect("attach page");
        assert!(attach.contains("\\-\\-pin"), "no --pin in the man page");
        assert!(
            !dir.join("man/bypass-generate.1").exists(),
            "the hidden command got a page"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
