//! Pushed tags name deployments: `<tag>.<service>.<zone>`.
//!
//! 1. A tag pushed to a service's source repository (`git push origin v1`) goes through the
//!    hook as a branch does (in a cluster, through etcd first) and is stored; it is not
//!    built.
//! 2. Once the tagged commit has a deployment that succeeded, the tag names the oldest
//!    such (every node of a cluster holds the same chain of deployments, so each names the
//!    same one, whichever of them it had fetched when the tag reached it): the store's deployment tag `refs/tags/<service>/<tag>` is made, the
//!    annotated tag with the source link that `git tag <service>/<tag> <revision>` in the
//!    deployment repository makes by hand, so `<tag>.<service>.<zone>` answers with it.
//! 3. A deployment tag never moves (the store's rule): a source tag moved or deleted later
//!    leaves it where it is, and a deployment tag made by hand under that name wins. A tag
//!    whose name is not a DNS label (`v1.0`) names nothing.
//! 4. It runs when a push's refs are handled (after its builds, when it waits for them)
//!    and, on a node of a cluster, when the node's source tags or deployments changed (the
//!    daemon's replication), so a tag names its deployment on every node.

use revboot_store::{BuildStatus, Store, WriteError};

use crate::git;
use crate::repos::SourceRepos;

/// The most tags of one service looked at.
const MAX_TAGS: usize = 1024;

/// Makes the deployment tag of each tag of `service`'s source repository whose commit has
/// a successful deployment and no deployment tag yet (rules 2 and 3); `pushed` are tags
/// (`refs/tags/…`, object) that a push being taken adds, which the repository does not
/// show yet.
pub(crate) async fn name_deployments(
    repos: &SourceRepos,
    store: &Store,
    service: &str,
    pushed: &[(String, String)],
) {
    let mut tags = Vec::new();
    for (refname, object) in pushed {
        let (Some(name), Ok(commit)) = (
            refname.strip_prefix("refs/tags/"),
            git::run_text(
                Some(&repos.path(service)),
                &[
                    "rev-parse",
                    "--verify",
                    "-q",
                    &format!("{object}^{{commit}}"),
                ],
            )
            .await,
        ) else {
            continue;
        };
        if revboot_store::protocol::check_label(name).is_ok() {
            tags.push((name.to_owned(), commit));
        }
    }
    let listed = git::run_text(
        Some(&repos.path(service)),
        &[
            "for-each-ref",
            "--format=%(refname:strip=2) %(objectname) %(*objectname)",
            "refs/tags/",
        ],
    )
    .await;
    let text = match listed {
        Ok(text) => text,
        Err(error) => {
            tracing::warn!(%error, service, "cannot list the tags of a source repository");
            return;
        }
    };
    tags.extend(
        text.lines()
            .filter_map(|line| {
                let mut words = line.split(' ');
                let (name, object) = (words.next()?, words.next()?);
                let commit = words.next().filter(|c| !c.is_empty()).unwrap_or(object);
                revboot_store::protocol::check_label(name)
                    .is_ok()
                    .then(|| (name.to_owned(), commit.to_owned()))
            })
            .take(MAX_TAGS),
    );
    if tags.is_empty() {
        return;
    }
    let (store, service) = (store.clone(), service.to_owned());
    let named = tokio::task::spawn_blocking(move || {
        let history = store.history(&service).unwrap_or_default();
        for (name, commit) in tags {
            // History is newest first: the oldest is the one every node agrees on.
            let Some(deployment) = history
                .iter()
                .rev()
                .find(|d| d.source_commit == commit && d.status == BuildStatus::Succeeded)
            else {
                continue;
            };
            match store.tag(&service, &name, &deployment.revision) {
                Ok(()) => {}
                Err(WriteError::TagExists { .. }) => {
                    tracing::debug!(service, tag = name, "a deployment tag of that name exists");
                }
                Err(error) => {
                    tracing::warn!(%error, service, tag = name, "cannot tag a deployment");
                }
            }
        }
    })
    .await;
    if let Err(error) = named {
        tracing::warn!(%error, "tagging deployments stopped");
    }
}
