//! Helpers shared by the unit tests: a store in a temporary directory and numbered
//! deployments.

use crate::{BuildStatus, ImageInput, NewDeployment, Revision, Store};

pub(crate) const MANIFEST: &str = "[build]\ncommand = [\"make\"]\nartifacts = [\"out/hello\"]\n";

pub(crate) fn source(n: u8) -> String {
    format!("{:02x}", n).repeat(20)
}

pub(crate) fn deploy(store: &Store, service: &str, n: u8, image: Option<&[u8]>) -> Revision {
    let source = source(n);
    let (status, images) = match image {
        Some(bytes) => (
            BuildStatus::Succeeded,
            vec![ImageInput {
                name: "hello".into(),
                reader: Box::new(std::io::Cursor::new(bytes.to_vec())),
            }],
        ),
        None => (BuildStatus::Failed, Vec::new()),
    };
    store
        .write_deployment(NewDeployment {
            service,
            status,
            manifest: Some(MANIFEST),
            images,
            build_log: format!("build {n}\n").as_bytes(),
            source_commit: &source,
            source_repo: service,
            source_ref: Some("refs/heads/main"),
            subject: &format!("Change {n}"),
        })
        .expect("written")
}

pub(crate) fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::init(dir.path().join("deploy.git")).expect("init");
    (dir, store)
}
