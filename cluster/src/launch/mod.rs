//! Launching a whole job: on this machine as supervised child processes (`local`,
//! `supervisor`), or as a SLURM heterogeneous job (`slurm`).

pub mod local;
pub mod slurm;
pub mod supervisor;

/// Where to launch.
#[derive(clap::Subcommand, Debug)]
pub enum Launch {
    /// Start the learner, actors and reward workers as child processes on this machine.
    Local(local::LocalArgs),
    /// Submit the job to SLURM as one heterogeneous job (learner, actor and reward
    /// components) rendered from cluster/slurm/quill.sbatch.
    Slurm(slurm::SlurmArgs),
}

/// Runs a launcher.
pub fn run(launch: Launch) -> anyhow::Result<()> {
    match launch {
        Launch::Local(args) => local::run(args),
        Launch::Slurm(args) => slurm::run(args),
    }
}
