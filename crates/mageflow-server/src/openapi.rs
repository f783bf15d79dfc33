//! The API's OpenAPI document, generated from the routes' annotations (utoipa), served at
//! `/api/v1/openapi.json` and checked into `docs/openapi.json` (a test keeps the two equal:
//! bless with `MAGEFLOW_BLESS=1 cargo test -p mageflow-server --lib openapi`).

use crate::routes;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Mageflow",
        description = "Workflows, control, history and live events of a Mageflow engine. Every route but /healthz, /readyz and this document takes `Authorization: Bearer <token>` (`mageflow token create`); roles: viewer reads, auditor also reads history and events, operator also submits and controls, admin all.",
        version = "1"
    ),
    paths(
        routes::ready,
        routes::submit,
        routes::list,
        routes::tree,
        routes::history,
        routes::detail,
        routes::children,
        routes::control_call,
        routes::bulk_control,
        routes::events,
        routes::tasks,
        routes::stats,
        routes::metrics,
    ),
    modifiers(&Bearer)
)]
pub struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document as JSON.
pub fn document() -> serde_json::Value {
    serde_json::to_value(ApiDoc::openapi()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checked_in_document_is_the_generated_one() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
        let generated = serde_json::to_string_pretty(&document()).unwrap_or_default() + "\n";
        if std::env::var("MAGEFLOW_BLESS").as_deref() == Ok("1") {
            std::fs::write(path, &generated).unwrap_or_else(|e| panic!("write {path}: {e}"));
        }
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert_eq!(
            checked_in, generated,
            "docs/openapi.json differs from the code's: bless with MAGEFLOW_BLESS=1"
        );
    }
}
