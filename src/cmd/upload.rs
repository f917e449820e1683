//! `hark upload`: transcribe everything waiting in the spool, oldest first, and exit. When no
//! endpoint answers, it gives up and the rest stays in the spool for the next try.

use super::Error;
use crate::config::Config;
use crate::session::shutdown;
use crate::session::{Outputs, Plain, Plan, Session, Uploads};
use crate::upload::{Patience, Report, Setup, SetupError};
use crate::url;

pub fn run(config: &Config) -> Result<Report, Error> {
    let plan = Plan {
        outputs: Outputs::Configured,
        spool: None,
        signals: true,
        notify: false,
        status: Some(None),
        uploads: None,
        capture: None,
    };
    // The key is checked once the outputs and the spool are up, as hark always has.
    let session = Session::start_with(config, plan, |plan, spool| {
        let Some(setup) = Setup::from_config(&config.transcribe)? else {
            return Err(Error::Setup(SetupError::NoKey {
                endpoint: url::redact(&config.transcribe.endpoint),
                env: config.transcribe.api_key_env.clone(),
            }));
        };
        let (pending, _) = spool.usage();
        tracing::info!(
            "uploading {pending} utterances from {}",
            spool.dir().display()
        );
        plan.uploads = Some(Uploads {
            setup,
            patience: Patience::GiveUp,
            workers: 1,
            results: false,
        });
        Ok(())
    })?;
    let ended = session.run(&mut Plain);
    let report = ended.report.unwrap_or_else(|| Report {
        waiting: ended.spool.usage().0,
        ..Report::default()
    });
    tracing::info!(
        "{} transcribed, {} failed, {} waiting in the spool",
        report.transcribed,
        report.failed,
        report.waiting
    );
    if !shutdown::upload_complete(report.failed, report.waiting) {
        return Err(Error::UploadsLeft(report));
    }
    Ok(report)
}
