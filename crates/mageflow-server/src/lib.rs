//! Mageflow's HTTP API (`/api/v1`, JSON), served by `mageflow serve --http ADDR` on any store:
//! submit workflows in the declarative format, list and filter them, read a workflow's tree
//! (large containers collapsed into counts and pages), a signature's detail and the history,
//! control signatures, and follow the log live (Server-Sent Events, resumable with
//! `Last-Event-ID`). Every request but `/healthz` and `/readyz` carries a bearer token whose
//! role ([`auth`]) decides what it may do; control calls record the token's name as their
//! actor. Every refusal is `{code, message, details}` ([`error`]). This is the only crate that
//! speaks HTTP.

pub mod auth;
pub mod catalog;
pub mod error;
pub mod hub;
pub mod openapi;
mod routes;
pub mod taskstats;
mod views;

pub use auth::{TokenError, Tokens};
pub use catalog::Catalog;
pub use error::ApiError;
pub use routes::{router, Access, Api};

/// Largest request body (a workflow definition, a control call's value): 413 above.
pub const BODY_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Most items of one page of the workflow list, of history, of a container's children.
pub const PAGE_MAX: usize = 1_000;
/// Page size when a request names none.
pub const PAGE_DEFAULT: usize = 100;
/// Children of a container shown inline in a workflow's tree; the rest are paged
/// (`…/nodes/{index}/children`), and the tree gives their counts by status.
pub const CHILDREN_INLINE: usize = 50;

/// Serve `api` on `listener` until `shutdown` resolves; the workflow list tails the log
/// meanwhile.
pub async fn serve(
    listener: tokio::net::TcpListener,
    api: Api,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let tail = tokio::spawn(api.catalog.clone().tail(api.handle.clone()));
    let hub = tokio::spawn(api.hub.clone().run(api.handle.log().clone()));
    let served = axum::serve(listener, router(api))
        .with_graceful_shutdown(shutdown)
        .await;
    tail.abort();
    hub.abort();
    served
}
