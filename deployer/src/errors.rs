//! Error text: the causes of an error, for messages that carry them as strings (runtime
//! records, consoles, summon refusals).

/// The causes of `error`, joined with `: `.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut source = error.source();
    while let Some(cause) = source {
        parts.push(cause.to_string());
        source = cause.source();
    }
    if parts.is_empty() {
        "no further detail".to_owned()
    } else {
        parts.join(": ")
    }
}
