//! The man page and shell completions, generated from the command line's own definition.

use clap::ValueEnum;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Artifact {
    Man,
    Bash,
    Zsh,
    Fish,
}

pub fn run(artifact: Artifact) -> anyhow::Result<()> {
    anyhow::bail!("generating {artifact:?} is not available in this build")
}
