//! The API's routes, extractors and token check, without a daemon.

use super::*;

#[test]
fn openapi_lists_exactly_the_routes() {
    let document: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
    let paths = document["paths"].as_object().expect("paths object");
    let mut documented: Vec<(String, String)> = paths
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .expect("path item object")
                .keys()
                .filter(|method| {
                    matches!(method.as_str(), "get" | "post" | "put" | "delete" | "patch")
                })
                .map(move |method| (method.clone(), path.clone()))
        })
        .collect();
    documented.sort();
    let mut routes: Vec<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    routes.sort();
    assert_eq!(documented, routes);
}

/// A value of each reply type that `openapi.json` documents, by schema name: one with
/// every optional field set and one with every optional field empty. A struct literal
/// names every field, so a field added to a reply type must be added here, and then
/// [`the_schemas_document_every_field_of_the_replies`] fails until the document has it.
fn documented_replies() -> Vec<(&'static str, [serde_json::Value; 2])> {
    use crate::action::{
        BuildLogView, ConfigView, ConsoleView, DaemonView, DeletedView, DeploymentView, DiffView,
        InstanceView, MoveView, NodeView, NodesView, RenamedView, ServiceView, ShowView,
        SummonView, TokenView, VarView,
    };
    fn node(_: bool) -> NodeView {
        NodeView {
            id: "n1".to_owned(),
            http: "http://127.0.0.1:8080".to_owned(),
            dns: "127.0.0.1:5353".to_owned(),
            pools: vec!["127.77.0.0/16".to_owned()],
            capacity: 256,
            since_ms: 1_700_000_000_000,
        }
    }
    fn nodes(set: bool) -> NodesView {
        NodesView {
            node: set.then(|| "n1".to_owned()),
            connected: set,
            nodes: vec![node(set)],
        }
    }
    fn deployment(set: bool) -> DeploymentView {
        DeploymentView {
            revision: "ab".repeat(20),
            short: "abababa".to_owned(),
            dns_name: "abababa.hello.revboot.test".to_owned(),
            source_commit: "cd".repeat(20),
            subject: "Say hello".to_owned(),
            source_ref: set.then(|| "refs/heads/main".to_owned()),
            status: "succeeded".to_owned(),
            image_size: set.then_some(4096),
            image_sha256: set.then(|| "ef".repeat(32)),
            time: 1_700_000_000,
            live: true,
        }
    }
    fn service(set: bool) -> ServiceView {
        ServiceView {
            name: "hello".to_owned(),
            live: set.then(|| "ab".repeat(20)),
            deployments: 3,
            dns_name: "hello.revboot.test".to_owned(),
        }
    }
    fn show(set: bool) -> ShowView {
        ShowView {
            deployment: deployment(set),
            manifest: set.then(|| "[run]\nport = 8080\n".to_owned()),
            labels: vec!["v1".to_owned()],
        }
    }
    fn diff(set: bool) -> DiffView {
        DiffView {
            a: "ab".repeat(20),
            b: "cd".repeat(20),
            manifest: "-port = 8080\n+port = 8081\n".to_owned(),
            image_size: (set.then_some(4096), set.then_some(8192)),
            image_changed: true,
        }
    }
    fn moved(set: bool) -> MoveView {
        MoveView {
            service: "hello".to_owned(),
            from: set.then(|| deployment(true)),
            to: deployment(set),
            check: set.then(|| "health check passed in 3.1 ms".to_owned()),
        }
    }
    fn var(set: bool) -> VarView {
        VarView {
            name: "API_KEY".to_owned(),
            value: set.then(|| "s3cret".to_owned()),
        }
    }
    fn config(set: bool) -> ConfigView {
        ConfigView {
            service: "hello".to_owned(),
            vars: vec![var(set)],
            restarted: set.then_some(1),
        }
    }
    fn daemon(set: bool) -> DaemonView {
        DaemonView {
            pid: 42,
            binary: "/usr/local/bin/revboot".to_owned(),
            upgrades: 1,
            serving_since_ms: 1_700_000_000_000,
            last_upgrade_ms: set.then_some(350),
            last_upgrade_instances: set.then_some(3),
            certificates: vec![crate::action::CertView {
                id: "hello".to_owned(),
                source: "acme".to_owned(),
                names: vec!["*.hello.revboot.test".to_owned()],
                state: "valid".to_owned(),
                not_after_ms: set.then_some(1_700_000_000_000),
                issued: 1,
                failures: 0,
                error: set.then(|| "ACME: connection refused".to_owned()),
                retry_at_ms: set.then_some(1_700_000_000_000),
                issuer: set.then(|| "CN=R11, O=Let's Encrypt, C=US".to_owned()),
                renew_at_ms: set.then_some(1_700_000_000_000),
            }],
        }
    }
    fn certificate(set: bool) -> crate::action::CertView {
        daemon(set).certificates.remove(0)
    }
    fn build_log(_: bool) -> BuildLogView {
        BuildLogView {
            revision: "ab".repeat(20),
            status: "failed".to_owned(),
            log: "error: no such file\n".to_owned(),
        }
    }
    fn console(set: bool) -> ConsoleView {
        ConsoleView {
            revision: "ab".repeat(20),
            client: set.then(|| "127.0.0.1".to_owned()),
            started_at_ms: 1_700_000_000_000,
            boot_ms: set.then_some(3),
            lifetime_ms: 60_000,
            outcome: "stopped: idle for 60s".to_owned(),
            console: "listening\n".to_owned(),
        }
    }
    fn summoned(_: bool) -> SummonView {
        SummonView {
            revision: "ab".repeat(20),
            dns_name: "abababa.hello.revboot.test".to_owned(),
            address: "127.0.0.2".to_owned(),
            addresses: vec!["127.0.0.2".to_owned(), "::ffff:127.0.0.2".to_owned()],
            port: 8080,
        }
    }
    fn instance(set: bool) -> InstanceView {
        InstanceView {
            service: "hello".to_owned(),
            revision: "ab".repeat(20),
            client: set.then(|| "127.0.0.1".to_owned()),
            replica: if set { 2 } else { 0 },
            address: "127.0.0.2".to_owned(),
            addresses: vec!["127.0.0.2".to_owned()],
            state: "ready".to_owned(),
            uptime_ms: 1_000,
            connections: 1,
            steered: set.then_some(2),
            pid: set.then_some(4242),
        }
    }
    fn build(set: bool) -> crate::action::BuildView {
        crate::action::BuildView {
            id: 7,
            service: "hello".to_owned(),
            source_ref: "refs/heads/main".to_owned(),
            source_commit: "cd".repeat(20),
            state: "succeeded".to_owned(),
            queued_at_ms: 1_700_000_000_000,
            started_at_ms: set.then_some(1_700_000_000_001),
            finished_at_ms: set.then_some(1_700_000_000_002),
            revision: set.then(|| "ab".repeat(20)),
            made_live: true,
            message: set.then(|| "built".to_owned()),
        }
    }
    fn console_event(set: bool) -> crate::feeds::ConsoleEvent {
        crate::feeds::ConsoleEvent::Started {
            instance: "i1".to_owned(),
            revision: "ab".repeat(20),
            client: set.then(|| "127.0.0.1".to_owned()),
            address: "127.0.0.2".to_owned(),
            dropped: 0,
        }
    }
    fn build_log_event(set: bool) -> crate::feeds::BuildLogEvent {
        crate::feeds::BuildLogEvent::Ended {
            state: "failed".to_owned(),
            revision: set.then(|| "ab".repeat(20)),
        }
    }
    fn deleted(set: bool) -> DeletedView {
        DeletedView {
            service: "hello".to_owned(),
            deployments: 2,
            kept: set,
            archive: set.then(|| "refs/revboot/deleted/hello/1700000000000/".to_owned()),
            source_archive: set
                .then(|| "/var/lib/revboot/src/.deleted/hello-1700000000000.git".to_owned()),
            stopped: 1,
            variables: 2,
        }
    }
    fn renamed(set: bool) -> RenamedView {
        RenamedView {
            service: "hello".to_owned(),
            to: "greet".to_owned(),
            dns_name: "greet.revboot.test".to_owned(),
            live: set.then(|| "ab".repeat(20)),
            deployments: 2,
            stopped: 0,
            variables: 1,
        }
    }
    fn token(_: bool) -> TokenView {
        TokenView {
            version: "0.1.0".to_owned(),
            zone: "revboot.test".to_owned(),
        }
    }
    fn pair<T: serde::Serialize>(make: fn(bool) -> T) -> [serde_json::Value; 2] {
        [true, false].map(|set| serde_json::to_value(make(set)).expect("serializable"))
    }
    vec![
        ("Service", pair(service)),
        ("Deleted", pair(deleted)),
        ("Renamed", pair(renamed)),
        ("Token", pair(token)),
        ("Deployment", pair(deployment)),
        ("Show", pair(show)),
        ("Diff", pair(diff)),
        ("Move", pair(moved)),
        ("BuildLog", pair(build_log)),
        ("Console", pair(console)),
        ("Summoned", pair(summoned)),
        ("Instance", pair(instance)),
        ("Config", pair(config)),
        ("Var", pair(var)),
        ("Daemon", pair(daemon)),
        ("Nodes", pair(nodes)),
        ("Node", pair(node)),
        ("Certificate", pair(certificate)),
        ("Build", pair(build)),
        ("ConsoleEvent", pair(console_event)),
        ("BuildLogEvent", pair(build_log_event)),
    ]
}

/// Every kind of [`ActionError`], as the API sends them.
fn every_error() -> Vec<serde_json::Value> {
    let errors = [
        ActionError::Invalid("m".to_owned()),
        ActionError::NotFound("m".to_owned()),
        ActionError::Ambiguous("m".to_owned()),
        ActionError::Conflict("m".to_owned()),
        ActionError::Unauthorized("m".to_owned()),
        ActionError::Unavailable("m".to_owned()),
        ActionError::Building("m".to_owned()),
        ActionError::Internal("m".to_owned()),
    ];
    for error in &errors {
        // A new kind does not compile here until it is listed above.
        match error {
            ActionError::Invalid(_)
            | ActionError::NotFound(_)
            | ActionError::Ambiguous(_)
            | ActionError::Conflict(_)
            | ActionError::Unauthorized(_)
            | ActionError::Unavailable(_)
            | ActionError::Building(_)
            | ActionError::Internal(_) => {}
        }
    }
    errors
        .iter()
        .map(|error| serde_json::to_value(error).expect("serializable"))
        .collect()
}

/// The JSON Schema type name of `value`.
fn type_of(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(n) if n.is_f64() => "number",
        serde_json::Value::Number(_) => "integer",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

/// What in `value` (at `at`) the schema does not document or does not allow, added to
/// `wrong`. With `complete`, every documented property must be present too.
fn check(
    document: &serde_json::Value,
    schema: &serde_json::Value,
    value: &serde_json::Value,
    at: &str,
    complete: bool,
    wrong: &mut Vec<String>,
) {
    if let Some(reference) = schema.get("$ref").and_then(|r| r.as_str()) {
        let name = reference.trim_start_matches("#/components/schemas/");
        let target = &document["components"]["schemas"][name];
        assert!(target.is_object(), "{at}: no schema {reference}");
        return check(document, target, value, at, complete, wrong);
    }
    if let Some(choices) = schema.get("oneOf").and_then(|c| c.as_array()) {
        let fits = choices.iter().any(|choice| {
            let mut none = Vec::new();
            check(document, choice, value, at, complete, &mut none);
            none.is_empty()
        });
        if !fits {
            wrong.push(format!("{at}: {value} fits none of {schema}"));
        }
        return;
    }
    let kind = type_of(value);
    let allowed = match &schema["type"] {
        serde_json::Value::String(one) => vec![one.as_str()],
        serde_json::Value::Array(many) => many.iter().filter_map(|t| t.as_str()).collect(),
        _ => Vec::new(),
    };
    if !allowed.contains(&kind) {
        wrong.push(format!("{at}: {kind} is not {allowed:?}"));
        return;
    }
    if let Some(values) = schema.get("enum").and_then(|e| e.as_array())
        && !values.contains(value)
    {
        wrong.push(format!("{at}: {value} is not one of {values:?}"));
    }
    match value {
        serde_json::Value::Object(fields) => {
            let properties = schema["properties"]
                .as_object()
                .expect("an object schema lists its properties");
            for (name, field) in fields {
                match properties.get(name) {
                    Some(property) => check(
                        document,
                        property,
                        field,
                        &format!("{at}.{name}"),
                        complete,
                        wrong,
                    ),
                    None => wrong.push(format!("{at}.{name} is not documented")),
                }
            }
            let required = schema["required"].as_array().into_iter().flatten();
            for name in required.filter_map(|n| n.as_str()) {
                if !fields.contains_key(name) {
                    wrong.push(format!("{at}.{name} is required but not sent"));
                }
            }
            if complete {
                for name in properties.keys() {
                    if !fields.contains_key(name) {
                        wrong.push(format!("{at}.{name} is documented but never sent"));
                    }
                }
            }
        }
        serde_json::Value::Array(items) => {
            for (n, item) in items.iter().enumerate() {
                check(
                    document,
                    &schema["items"],
                    item,
                    &format!("{at}[{n}]"),
                    complete,
                    wrong,
                );
            }
        }
        _ => {}
    }
}

#[test]
fn the_schemas_document_every_field_of_the_replies() {
    let document: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
    let schemas = document["components"]["schemas"]
        .as_object()
        .expect("components.schemas object");
    let mut wrong = Vec::new();
    let mut checked = vec!["Error"];
    for error in every_error() {
        check(
            &document,
            &schemas["Error"],
            &error,
            "Error",
            true,
            &mut wrong,
        );
    }
    for (name, [full, empty]) in documented_replies() {
        let schema = schemas
            .get(name)
            .unwrap_or_else(|| panic!("openapi.json has no schema {name}"));
        check(&document, schema, &full, name, true, &mut wrong);
        check(&document, schema, &empty, name, false, &mut wrong);
        checked.push(name);
    }
    let mut documented: Vec<&str> = schemas.keys().map(String::as_str).collect();
    documented.sort_unstable();
    checked.sort_unstable();
    assert_eq!(documented, checked, "a schema documents no reply type");
    assert!(
        wrong.is_empty(),
        "openapi.json and the reply types differ:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn token_as_bearer_or_basic_password() {
    let mut headers = HeaderMap::new();
    assert!(!authorized(&headers, "s3cret"));
    headers.insert(
        header::AUTHORIZATION,
        "Bearer s3cret".parse().expect("header"),
    );
    assert!(authorized(&headers, "s3cret"));
    assert!(!authorized(&headers, "other"));
    // "git:s3cret"
    headers.insert(
        header::AUTHORIZATION,
        "Basic Z2l0OnMzY3JldA==".parse().expect("header"),
    );
    assert!(authorized(&headers, "s3cret"));
    assert!(!authorized(&headers, "s3cre"));
}
