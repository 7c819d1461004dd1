//! The man page and shell completions, generated from the command line's own definition, so
//! that the packages always describe the flags this binary accepts.

use std::io::Write as _;

use anyhow::Context as _;

use clap_complete::Shell;

use crate::cli::{Artifact, command};

/// Writes the artifact to stdout.
pub fn run(artifact: Artifact) -> anyhow::Result<()> {
    let bytes = render(artifact)?;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&bytes)
        .and_then(|()| stdout.flush())
        .context("writing to stdout")
}

pub fn render(artifact: Artifact) -> anyhow::Result<Vec<u8>> {
    let mut command = command();
    // The binary's installed name, whatever the file was called when it ran.
    command = command.name(NAME).bin_name(NAME);
    let mut out = Vec::new();
    let shell = match artifact {
        Artifact::Man => {
            // The date is left out so that the page depends on the sources alone.
            clap_mangen::Man::new(command)
                .section("8")
                .manual("System Administration")
                .source(format!("{NAME} {}", env!("CARGO_PKG_VERSION")))
                .render(&mut out)
                .context("rendering the man page")?;
            return Ok(out);
        }
        Artifact::Bash => Shell::Bash,
        Artifact::Zsh => Shell::Zsh,
        Artifact::Fish => Shell::Fish,
    };
    clap_complete::generate(shell, &mut command, NAME, &mut out);
    Ok(out)
}

const NAME: &str = "observer";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_page_lists_flags_and_subcommands() {
        let page = String::from_utf8(render(Artifact::Man).unwrap()).unwrap();
        assert!(page.starts_with(".ie"), "{page:.200}");
        assert!(page.contains(".TH observer 8"), "{page:.400}");
        assert!(page.contains("web.listen\\-address"));
        // The NAME line says what the command is (not a flag group's description).
        assert!(
            page.contains(
                ".SH NAME\nobserver \\- eBPF observer of module integrity, lockdown decisions"
            ),
            "{page:.400}"
        );
        assert!(page.contains("probes"));
        // Hidden: a packaging tool, not for operators.
        assert!(!page.contains("generate"));
    }

    #[test]
    fn completions_name_the_binary() {
        let bash = String::from_utf8(render(Artifact::Bash).unwrap()).unwrap();
        assert!(bash.contains("complete -F _observer"), "{bash:.300}");
        let zsh = String::from_utf8(render(Artifact::Zsh).unwrap()).unwrap();
        assert!(zsh.starts_with("#compdef observer"));
        let fish = String::from_utf8(render(Artifact::Fish).unwrap()).unwrap();
        assert!(fish.contains("complete -c observer"));
    }
}
