//! The routes of `/api/v1` and what each role may do with them.

use crate::auth::Tokens;
use crate::catalog::{Catalog, Filter};
use crate::error::ApiError;
use crate::hub::{Frame, READ_BATCH};
use crate::{views, BODY_BYTES_MAX, PAGE_DEFAULT, PAGE_MAX};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use mageflow_core::{SignatureId, Timestamp, WorkflowId};
use mageflow_engine::control::{self, ControlOp, Role};
use mageflow_engine::Handle;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// Who may call the API.
#[derive(Clone, Debug)]
pub enum Access {
    /// Bearer tokens of a tokens file.
    Tokens(Arc<Tokens>),
    /// No token asked: every caller is `local`, an admin. Only on a loopback address
    /// (`mageflow serve --insecure-no-auth`).
    Insecure,
}

/// What the handlers share.
#[derive(Clone)]
pub struct Api {
    pub handle: Handle,
    pub access: Access,
    pub catalog: Catalog,
    /// The live end of the event streams (run by [`crate::serve`]).
    pub hub: crate::hub::Hub,
}

impl Api {
    pub fn new(handle: Handle, access: Access) -> Self {
        Self {
            handle,
            access,
            catalog: Catalog::default(),
            hub: Default::default(),
        }
    }
}

/// The caller of a request: its token's name and role.
struct Caller {
    name: String,
    role: Role,
}

impl Api {
    fn caller(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let tokens = match &self.access {
            Access::Insecure => {
                return Ok(Caller {
                    name: "local".into(),
                    role: Role::Admin,
                })
            }
            Access::Tokens(t) => t,
        };
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| ApiError::unauthenticated("send `Authorization: Bearer <token>`"))?;
        let t = tokens
            .check(token.trim())
            .ok_or_else(|| ApiError::unauthenticated("this token is not known (revoked?)"))?;
        Ok(Caller {
            name: t.name.clone(),
            role: t.role,
        })
    }

    fn require(
        &self,
        headers: &HeaderMap,
        allowed: impl Fn(Role) -> bool,
        what: &str,
    ) -> Result<Caller, ApiError> {
        let c = self.caller(headers)?;
        if !allowed(c.role) {
            return Err(ApiError::forbidden(format!(
                "a {} token may not {what}",
                c.role.name()
            )));
        }
        Ok(c)
    }
}

/// Every route of the API.
pub fn router(api: Api) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/api/v1/workflows", post(submit).get(list))
        .route("/api/v1/workflows/{id}", get(tree))
        .route("/api/v1/workflows/{id}/history", get(history))
        .route("/api/v1/workflows/{id}/nodes/{index}", get(detail))
        .route(
            "/api/v1/workflows/{id}/nodes/{index}/children",
            get(children),
        )
        .route("/api/v1/signatures/{sig}/{op}", post(control_call))
        .route("/api/v1/workflows/bulk/{op}", post(bulk_control))
        .route("/api/v1/events", get(events))
        .route("/api/v1/tasks", get(tasks))
        .route("/api/v1/stats", get(stats))
        .route("/metrics", get(metrics))
        .route(
            "/api/v1/openapi.json",
            get(|| async { Json(crate::openapi::document()) }),
        )
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(api)
}

/// Security headers on every response; CORS is off (no `Access-Control-*` header is sent).
async fn security_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    for (name, value) in [
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-store"),
        ("content-security-policy", "default-src 'none'"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    res
}

#[utoipa::path(get, path = "/readyz", responses((status = 200, description = "the log is open")))]
pub(crate) async fn ready(State(api): State<Api>) -> Response {
    Json(json!({ "ready": true, "log_head": api.handle.log().head() })).into_response()
}

fn parse_workflow(id: &str) -> Result<WorkflowId, ApiError> {
    id.parse().map_err(|_| {
        ApiError::bad_request("invalid_id", format!("{id:?} is not a workflow id (wf_…)"))
    })
}

fn body(bytes: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    bytes.map_err(|r| {
        let status = r.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "too_large"
        } else {
            "invalid_body"
        };
        ApiError::new(status, code, r.body_text())
    })
}

/// Namespace of the workflow ids made from idempotency keys.
const IDEMPOTENCY_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6d61_6765_666c_6f77_0001_0000_0000_0001);

/// `POST /api/v1/workflows`: a workflow definition (`docs/workflow.schema.json`), created and
/// run. With `Idempotency-Key`, a resubmission (same key, same token) answers the first id.
#[utoipa::path(post, path = "/api/v1/workflows", security(("bearer" = [])),
    request_body(content = Object, description = "A workflow definition (docs/workflow.schema.json)"),
    params(("Idempotency-Key" = Option<String>, Header, description = "A resubmission with the same key answers the first id")),
    responses((status = 201, description = "created and running: {\"id\": \"wf_…\"}", body = Object), (status = 400, description = "not a valid definition", body = ApiError), (status = 413, description = "body too large", body = ApiError), (status = 401, description = "no known token", body = ApiError), (status = 403, description = "the role may not", body = ApiError)))]
pub(crate) async fn submit(
    State(api): State<Api>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let caller = api.require(&headers, |r| r >= Role::Operator, "submit workflows")?;
    let bytes = body(bytes)?;
    let (sig, input) = mageflow_engine::definition::parse(&bytes)?;
    let h = api.handle.as_principal(caller.name.clone());
    let key = headers
        .get("idempotency-key")
        .map(|v| v.to_str().map(str::to_owned))
        .transpose()
        .map_err(|_| ApiError::bad_request("invalid_header", "Idempotency-Key is not text"))?;
    let id = match key {
        Some(key) => {
            let name = format!("{}\u{0}{key}", caller.name);
            let id = WorkflowId(uuid::Uuid::new_v5(&IDEMPOTENCY_NAMESPACE, name.as_bytes()));
            h.submit_idempotent(id, sig, input).await?;
            id
        }
        None => h.submit(sig, input).await?,
    };
    Ok((StatusCode::CREATED, Json(json!({ "id": id.to_string() }))).into_response())
}

/// The list's filter, in a bulk control call's body.
#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct FilterQuery {
    status: Option<String>,
    kind: Option<String>,
    name: Option<String>,
    /// Free text, in ids and names.
    q: Option<String>,
    /// µs since the epoch.
    created_after: Option<i64>,
    /// µs since the epoch.
    created_before: Option<i64>,
}

impl From<FilterQuery> for Filter {
    fn from(f: FilterQuery) -> Self {
        Filter {
            status: f.status,
            kind: f.kind,
            name: f.name,
            text: f.q,
            created_after: f.created_after.map(Timestamp::from_micros),
            created_before: f.created_before.map(Timestamp::from_micros),
        }
    }
}

/// The list's query: its filter, and where the page starts (a query string is flat, and
/// serde refuses no unknown field of a flattened struct: so the filter's fields again).
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    status: Option<String>,
    kind: Option<String>,
    name: Option<String>,
    /// Free text, in ids and names.
    q: Option<String>,
    /// µs since the epoch.
    created_after: Option<i64>,
    /// µs since the epoch.
    created_before: Option<i64>,
    /// A `next_cursor` of the page before.
    cursor: Option<String>,
    limit: Option<usize>,
}

impl ListQuery {
    fn filter(&self) -> Filter {
        Filter::from(FilterQuery {
            status: self.status.clone(),
            kind: self.kind.clone(),
            name: self.name.clone(),
            q: self.q.clone(),
            created_after: self.created_after,
            created_before: self.created_before,
        })
    }
}

/// A command named in a path; `submit` has a route of its own.
fn operation(op: &str) -> Result<ControlOp, ApiError> {
    match op.parse() {
        Ok(ControlOp::Submit) => Err(ApiError::not_found("submit is POST /api/v1/workflows")),
        Ok(op) => Ok(op),
        Err(_) => Err(ApiError::not_found(format!("no command {op:?}"))),
    }
}

fn limit(requested: Option<usize>) -> Result<usize, ApiError> {
    match requested.unwrap_or(PAGE_DEFAULT) {
        0 => Err(ApiError::bad_request(
            "invalid_page",
            "limit must be at least 1",
        )),
        n if n > PAGE_MAX => Err(ApiError::bad_request(
            "invalid_page",
            format!("limit {n} is over the page size limit of {PAGE_MAX}"),
        )),
        n => Ok(n),
    }
}

/// `GET /api/v1/workflows`: newest first, filtered (status, kind, name, free text `q` on ids
/// and names, `created_after`/`created_before` in µs since the epoch), paged by `cursor`, with
/// the counts by status of everything the filter matches.
#[utoipa::path(get, path = "/api/v1/workflows", security(("bearer" = [])), params(ListQuery),
    responses((status = 200, description = "a page, newest first", body = crate::catalog::Page), (status = 400, description = "a bad filter, cursor or limit", body = ApiError), (status = 401, description = "no known token", body = ApiError), (status = 403, description = "the role may not", body = ApiError)))]
pub(crate) async fn list(
    State(api): State<Api>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    api.require(&headers, |_| true, "list workflows")?;
    let Query(q) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let limit = limit(q.limit)?;
    // Catch up first: a workflow submitted just before is listed.
    api.catalog.catch_up(&api.handle)?;
    let filter = q.filter();
    let cursor = q
        .cursor
        .as_deref()
        .map(|c| {
            crate::catalog::parse_cursor(c).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_cursor",
                    format!("{c:?} is not a cursor this list gave"),
                )
            })
        })
        .transpose()?;
    Ok(Json(api.catalog.page(&filter, cursor, limit)).into_response())
}

/// `GET /api/v1/workflows/{id}`: the tree, containers' first children inline, the rest counted.
#[utoipa::path(get, path = "/api/v1/workflows/{id}", security(("bearer" = [])), params(("id" = String, Path, description = "wf_…")),
    responses((status = 200, description = "the tree", body = views::TreeView), (status = 404, description = "no such workflow", body = ApiError), (status = 401, description = "no known token", body = ApiError), (status = 403, description = "the role may not", body = ApiError)))]
pub(crate) async fn tree(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    api.require(&headers, |_| true, "read workflows")?;
    let wf = parse_workflow(&id)?;
    let now = api.handle.config().clock.now();
    let view = api.handle.inspect(wf, move |w| views::tree(w, now)).await?;
    Ok(Json(view).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct PageQuery {
    after: Option<u64>,
    offset: Option<usize>,
    limit: Option<usize>,
}

/// `GET /api/v1/workflows/{id}/history?after=SEQ&limit=N`: the events after `after`, archived
/// ones included. Auditors and above.
#[utoipa::path(get, path = "/api/v1/workflows/{id}/history", security(("bearer" = [])), params(("id" = String, Path, description = "wf_…"), PageQuery),
    responses((status = 200, description = "{\"events\": [...], \"next_after\": seq}", body = Object), (status = 404, description = "no such workflow", body = ApiError), (status = 401, description = "no known token", body = ApiError), (status = 403, description = "the role may not", body = ApiError)))]
pub(crate) async fn history(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    api.require(&headers, Role::reads_history, "read history")?;
    let Query(q) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let limit = limit(q.limit)?;
    let wf = parse_workflow(&id)?;
    let events = api.handle.history(wf)?;
    if events.is_empty() {
        return Err(mageflow_engine::Error::NoSuchWorkflow(wf).into());
    }
    let after = q.after.unwrap_or(0);
    let page: Vec<_> = events
        .into_iter()
        .filter(|e| e.seq > after)
        .take(limit + 1)
        .collect();
    let more = page.len() > limit;
    let page: Vec<_> = page.into_iter().take(limit).collect();
    let next = more.then(|| page.last().map(|e| e.seq)).flatten();
    Ok(Json(json!({ "events": page, "next_after": next })).into_response())
}

fn parse_index(index: &str) -> Result<u32, ApiError> {
    index.parse().map_err(|_| {
        ApiError::bad_request("invalid_id", format!("{index:?} is not a signature index"))
    })
}

/// `GET /api/v1/workflows/{id}/nodes/{index}`: a signature's spec, input, result, attempts.
#[utoipa::path(get, path = "/api/v1/workflows/{id}/nodes/{index}", security(("bearer" = [])), params(("id" = String, Path, description = "wf_…"), ("index" = u32, Path, description = "the signature's index")),
    responses((status = 200, description = "the signature", body = views::DetailView), (status = 404, description = "no such signature", body = ApiError), (status = 401, description = "no known token", body = ApiError), (status = 403, description = "the role may not", body = ApiError)))]
pub(crate) async fn detail(
    State(api): State<Api>,
    headers: HeaderMap,
    Path((id, index)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    api.require(&headers, |_| true, "read workflows")?;
    let wf = parse_workflow(&id)?;
    let index = parse_index(&index)?;
    let history = api.handle.history(wf)?;
    let view = api
        .handle
        .inspect(wf, move |w| views::detail(w, index, &history))
        .await?
        .ok_or(mageflow_engine::Error::NoSuchSignature(SignatureId {
            workflow: wf,
            index,
        }))?;
    Ok(Json(view).into_response())
}

/// `GET /api/v1/workflows/{id}/nodes/{index}/children?offset&limit`: a page of a container's
/// children — how a swarm of a million items is read, a page at a time.
#[utoipa::path(get, path = "/api/v1/workflows/{id}/nodes/{index}/children", security(("bearer" = [])), params(("id" = String, Path, description = "wf_…"), ("index" = u32, Path, description = "the container's index"), PageQuery),
    responses((status = 200, description = "a page of children", body = views::ChildrenView), (status = 404, description = "no such signature", body = ApiError), (status = 401, description = "no known token", body = ApiError), (status = 403, description = "the role may not", body = ApiError)))]
pub(crate) async fn children(
    State(api): State<Api>,
    headers: HeaderMap,
    Path((id, index)): Path<(String, String)>,
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    api.require(&headers, |_| true, "read workflows")?;
    let Query(q) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let limit = limit(q.limit)?;
    let wf = parse_workflow(&id)?;
    let index = parse_index(&index)?;
    let offset = q.offset.unwrap_or(0);
    let view = api
        .handle
        .inspect(wf, move |w| views::children(w, index, offset, limit))
        .await?
        .ok_or(mageflow_engine::Error::NoSuchSignature(SignatureId {
            workflow: wf,
            index,
        }))?;
    Ok(Json(view).into_response())
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ControlBody {
    #[serde(default)]
    confirm: bool,
    #[serde(default)]
    #[schema(value_type = Object)]
    value: Option<Value>,
}

/// `POST /api/v1/signatures/{sig}/{op}` with `{"confirm": bool, "value": …}`: `cancel` (only
/// with `confirm`), `interrupt`, `suspend`, `resume`, `delete`, `restore`, `rerun`, `priority`
/// (value: a number), `signal` (value: what the gate gets), `reject` (value: the reason).
/// Answered once the command is durable; its events name the token as their actor.
#[utoipa::path(post, path = "/api/v1/signatures/{sig}/{op}", security(("bearer" = [])),
    params(("sig" = String, Path, description = "sig_… or wf_… (its root)"), ("op" = String, Path, description = "cancel, interrupt, suspend, resume, delete, restore, rerun, priority, signal, reject")),
    request_body(content = ControlBody, description = "optional"),
    responses((status = 200, description = "done and durable: {\"message\": …}", body = Object), (status = 409, description = "refused now", body = ApiError), (status = 428, description = "cancel without confirm", body = ApiError), (status = 401, description = "no known token", body = ApiError), (status = 403, description = "the role may not", body = ApiError)))]
pub(crate) async fn control_call(
    State(api): State<Api>,
    headers: HeaderMap,
    Path((sig, op)): Path<(String, String)>,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let op = operation(&op)?;
    let caller = api.require(&headers, |r| r.allows(op), &format!("{op}"))?;
    let target = control::parse_target(&sig)?;
    let bytes = body(bytes)?;
    let req: ControlBody = if bytes.is_empty() {
        ControlBody::default()
    } else {
        serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_request("invalid_body", e.to_string()))?
    };
    let h = api.handle.as_principal(caller.name);
    let message = control::apply(&h, op, target, req.confirm, req.value).await?;
    Ok(Json(json!({ "message": message })).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BulkBody {
    /// What it acts on: the roots of the workflows the list's filter matches.
    #[serde(default)]
    filter: FilterQuery,
    /// Count what it would touch; change nothing.
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    confirm: bool,
    #[serde(default)]
    #[schema(value_type = Object)]
    value: Option<Value>,
}

/// Most workflows one bulk control call touches (a larger filter is refused: narrow it).
pub const BULK_CONTROL_MAX: usize = 10_000;

/// `POST /api/v1/workflows/bulk/{op}` with `{filter, dry_run, confirm, value}`: the command on
/// the root of every workflow the filter matches (the list's filter). `dry_run` answers how
/// many and which it would touch, changing nothing; otherwise each is carried out in turn and
/// the answer counts those done and lists those refused with their code.
#[utoipa::path(post, path = "/api/v1/workflows/bulk/{op}", security(("bearer" = [])), params(("op" = String, Path, description = "a command, as for one signature")),
    request_body(content = BulkBody),
    responses((status = 200, description = "{matched, workflows} on a dry run, else {matched, done, refused}", body = Object), (status = 400, description = "a bad body, or more than 10 000 match", body = ApiError), (status = 401, description = "no known token", body = ApiError), (status = 403, description = "the role may not", body = ApiError)))]
pub(crate) async fn bulk_control(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(op): Path<String>,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let op = operation(&op)?;
    let caller = api.require(&headers, |r| r.allows(op), &format!("{op}"))?;
    let bytes = body(bytes)?;
    let req: BulkBody = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request("invalid_body", e.to_string()))?;
    api.catalog.catch_up(&api.handle)?;
    let filter = Filter::from(req.filter);
    let page = api.catalog.page(&filter, None, BULK_CONTROL_MAX);
    if page.next_cursor.is_some() {
        return Err(ApiError::bad_request(
            "too_many",
            format!("the filter matches more than {BULK_CONTROL_MAX} workflows: narrow it"),
        ));
    }
    let ids: Vec<String> = page.items.iter().map(|s| s.id.to_string()).collect();
    if req.dry_run {
        return Ok(
            Json(json!({ "matched": ids.len(), "workflows": ids, "dry_run": true }))
                .into_response(),
        );
    }
    let h = api.handle.as_principal(caller.name);
    let (mut done, mut refused) = (0u64, Vec::new());
    for s in &page.items {
        let target = SignatureId::root(s.id);
        match control::apply(&h, op, target, req.confirm, req.value.clone()).await {
            Ok(_) => done += 1,
            Err(e) => refused.push(json!({
                "id": s.id.to_string(),
                "code": e.code(),
                "message": e.to_string(),
            })),
        }
    }
    Ok(Json(json!({ "matched": ids.len(), "done": done, "refused": refused })).into_response())
}

/// `GET /api/v1/tasks`: the tasks this engine's registry serves, with their retry policy,
/// timeouts and return field.
#[utoipa::path(get, path = "/api/v1/tasks", security(("bearer" = [])), responses((status = 200, description = "{tasks: [{name, retry, timeout_ms, heartbeat_timeout_ms, return_field}]}", body = Object), (status = 401, description = "no known token", body = ApiError), (status = 403, description = "the role may not", body = ApiError)))]
pub(crate) async fn tasks(
    State(api): State<Api>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    api.require(&headers, |_| true, "read the task registry")?;
    let registry = api.handle.registry();
    let mut out = Vec::new();
    for name in registry.names() {
        let def = registry.get(name)?;
        out.push(json!({
            "name": name,
            "retry": def.retry,
            "timeout_ms": def.execution_timeout().map(|d| d.as_millis() as u64),
            "heartbeat_timeout_ms": def.heartbeat_timeout.map(|d| d.as_millis() as u64),
            "return_field": def.return_field,
        }));
    }
    Ok(Json(json!({ "tasks": out })).into_response())
}

/// The engine's counters, and the list's counts by status.
fn counters(api: &Api) -> Vec<(&'static str, &'static str, u64)> {
    use std::sync::atomic::Ordering::Relaxed;
    let s = api.handle.stats();
    vec![
        (
            "events_written_total",
            "Events made durable in the log.",
            s.events_written.load(Relaxed),
        ),
        (
            "appends_total",
            "Appends made durable.",
            s.appends.load(Relaxed),
        ),
        (
            "append_failures_total",
            "Appends that failed.",
            s.append_failures.load(Relaxed),
        ),
        (
            "attempts_started_total",
            "Task attempts started.",
            s.attempts_started.load(Relaxed),
        ),
        (
            "tasks_succeeded_total",
            "Task attempts that succeeded.",
            s.tasks_succeeded.load(Relaxed),
        ),
        (
            "tasks_failed_total",
            "Tasks that failed for good.",
            s.tasks_failed.load(Relaxed),
        ),
        (
            "retries_scheduled_total",
            "Retries scheduled.",
            s.retries_scheduled.load(Relaxed),
        ),
        (
            "workflows_finished_total",
            "Workflows finished.",
            s.workflows_finished.load(Relaxed),
        ),
        (
            "running",
            "Attempts holding a worker slot now.",
            s.running.load(Relaxed),
        ),
        (
            "log_head",
            "Position of the last event in the log.",
            api.handle.log().head(),
        ),
    ]
}

/// `GET /api/v1/stats`: the engine's counters and the workflows by status.
#[utoipa::path(get, path = "/api/v1/stats", security(("bearer" = [])), responses((status = 200, description = "{engine: {counters}, workflows_by_status}", body = Object), (status = 401, description = "no known token", body = ApiError), (status = 403, description = "the role may not", body = ApiError)))]
pub(crate) async fn stats(
    State(api): State<Api>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    api.require(&headers, |_| true, "read stats")?;
    api.catalog.catch_up(&api.handle)?;
    let engine: serde_json::Map<String, Value> = counters(&api)
        .into_iter()
        .map(|(name, _, v)| (name.to_owned(), json!(v)))
        .collect();
    let by_status = api.catalog.page(&Filter::default(), None, 1).counts;
    let tasks = api.catalog.task_figures();
    Ok(
        Json(json!({ "engine": engine, "workflows_by_status": by_status, "tasks": tasks }))
            .into_response(),
    )
}

/// `GET /metrics`: the same in Prometheus's text format (any valid token).
#[utoipa::path(get, path = "/metrics", security(("bearer" = [])), responses((status = 200, description = "Prometheus text format", content_type = "text/plain"), (status = 401, description = "no known token", body = ApiError), (status = 403, description = "the role may not", body = ApiError)))]
pub(crate) async fn metrics(
    State(api): State<Api>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    api.require(&headers, |_| true, "read metrics")?;
    api.catalog.catch_up(&api.handle)?;
    let mut text = String::new();
    for (name, help, value) in counters(&api) {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        text.push_str(&format!(
            "# HELP mageflow_{name} {help}\n# TYPE mageflow_{name} {kind}\nmageflow_{name} {value}\n"
        ));
    }
    text.push_str("# HELP mageflow_workflows Workflows by the status of their root.\n# TYPE mageflow_workflows gauge\n");
    for (status, n) in api.catalog.page(&Filter::default(), None, 1).counts {
        text.push_str(&format!("mageflow_workflows{{status=\"{status}\"}} {n}\n"));
    }
    let tasks = api.catalog.task_figures();
    for (metric, help, kind) in [
        (
            "task_attempts_started_total",
            "Attempts started, by task.",
            "counter",
        ),
        (
            "task_failures_total",
            "Tasks failed for good, by task.",
            "counter",
        ),
        (
            "task_queue_depth",
            "Tasks waiting to start, by task.",
            "gauge",
        ),
        (
            "task_duration_p99_ms",
            "p99 of the latest attempts' durations, by task.",
            "gauge",
        ),
    ] {
        text.push_str(&format!(
            "# HELP mageflow_{metric} {help}\n# TYPE mageflow_{metric} {kind}\n"
        ));
        for (task, t) in &tasks {
            let value = match metric {
                "task_attempts_started_total" => t.started as f64,
                "task_failures_total" => t.failed as f64,
                "task_queue_depth" => t.queued as f64,
                _ => t.p99_ms,
            };
            // Task names are the registry's; quotes and backslashes escaped as the format asks.
            let task = task.replace('\\', "\\\\").replace('"', "\\\"");
            text.push_str(&format!("mageflow_{metric}{{task=\"{task}\"}} {value}\n"));
        }
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct EventsQuery {
    workflow: Option<String>,
    kind: Option<String>,
    /// Position to start after (the `Last-Event-ID` header wins).
    after: Option<u64>,
}

/// `GET /api/v1/events?workflow=&kind=`: the log as Server-Sent Events, each with its log
/// position as `id`, from after `Last-Event-ID` (or `after`, or now): a client that reconnects
/// with the last id it saw misses nothing and sees nothing twice. Auditors and above (events
/// carry history).
#[utoipa::path(get, path = "/api/v1/events", security(("bearer" = [])), params(EventsQuery, ("Last-Event-ID" = Option<u64>, Header, description = "resume after this log position")),
    responses((status = 200, description = "text/event-stream: one event per log event, id = its position", content_type = "text/event-stream"), (status = 401, description = "no known token", body = ApiError), (status = 403, description = "the role may not", body = ApiError)))]
pub(crate) async fn events(
    State(api): State<Api>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    api.require(&headers, Role::reads_history, "follow events")?;
    let Query(q) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let workflow = q.workflow.as_deref().map(parse_workflow).transpose()?;
    let last_id = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::bad_request("invalid_header", "Last-Event-ID is not a log position")
                })
        })
        .transpose()?;
    let log = api.handle.log().clone();
    // Subscribed before the catch-up reads the log: nothing falls between the two.
    let live = api.hub.subscribe();
    let from = match last_id.or(q.after) {
        Some(p) => p + 1,
        None => log.head() + 1,
    };
    let kind = q.kind;
    let keep = move |f: &Frame| {
        workflow.is_none_or(|w| w == f.stream) && kind.as_deref().is_none_or(|k| k == f.kind)
    };
    let sse = |f: &Frame| {
        SseEvent::default()
            .id(f.position.to_string())
            .event(f.kind)
            .data(f.data.as_str())
    };
    // (log, hub, next position to send, caught up with the hub, frames to send)
    let state = (log, live, from, false, VecDeque::new());
    let stream = futures_util::stream::unfold(
        state,
        move |(log, mut live, mut next, mut caught_up, mut buf)| {
            let keep = keep.clone();
            async move {
                loop {
                    if let Some(ev) = buf.pop_front() {
                        return Some((Ok::<_, Infallible>(ev), (log, live, next, caught_up, buf)));
                    }
                    if !caught_up {
                        match log.read_all(next, READ_BATCH) {
                            Ok(batch) if !batch.is_empty() => {
                                for r in &batch {
                                    next = r.position + 1;
                                    let f = Frame::of(r);
                                    if keep(&f) {
                                        buf.push_back(sse(&f));
                                    }
                                }
                            }
                            Ok(_) => caught_up = true,
                            Err(e) => {
                                tracing::warn!(error = %e, "http: an event stream could not read the log");
                                return None;
                            }
                        }
                        continue;
                    }
                    match live.recv().await {
                        Ok(batch) => {
                            let from = next;
                            for f in batch.iter().filter(|f| f.position >= from) {
                                if f.position > next {
                                    // A gap: the log has what is missing.
                                    caught_up = false;
                                    break;
                                }
                                next += 1;
                                if keep(f) {
                                    buf.push_back(sse(f));
                                }
                            }
                        }
                        // The hub's buffer moved past this client: the log has it.
                        Err(broadcast::error::RecvError::Lagged(_)) => caught_up = false,
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        },
    );
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}
