//! JavaScript objects as core traits: a handler function as [`Handler`], a transport object
//! as [`DirectSource`], a registry object as [`Registry`].
//!
//! Each adapter keeps its JS value by reference and touches it only inside [`JsThread`]
//! closures. What JS returns is checked: a wrong shape is an error for the caller, never a
//! crash.

use std::collections::VecDeque;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use napi::Env;
use napi::bindgen_prelude::*;
use napi::threadsafe_function::UnknownReturnValue;
use napi_derive::napi;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::js::{JsFn, JsThread, Json, Lenient, Pending, PersistentObject, describe};
use super::sse_connection::{SseConnection, SseSource, SseTarget};
use crate::core::delivery::{Handler, Outcome, Settled};
use crate::core::error::{Error as CoreError, Result as CoreResult};
use crate::core::key_rotation::{Registry, RegistryCredential};
use crate::core::message::{self, ConduitMessage};
use crate::core::transport::{DirectSource, Page};

/// Messages handed to JS per trip to the JS thread while the handler stays synchronous.
const BATCH: usize = 256;

/// A message as JS sees it.
#[napi(object, js_name = "ConduitMessage")]
pub struct JsMessage {
    pub id: String,
    pub from: String,
    pub content: String,
    pub tags: Option<Vec<String>>,
    pub thread_id: Option<String>,
    pub group_id: Option<String>,
    pub timestamp: String,
    pub metadata: Option<Value>,
}

impl From<ConduitMessage> for JsMessage {
    fn from(m: ConduitMessage) -> Self {
        Self {
            id: m.id,
            from: m.from,
            content: m.content,
            tags: m.tags,
            thread_id: m.thread_id,
            group_id: m.group_id,
            timestamp: m.timestamp,
            metadata: m.metadata.map(Value::Object),
        }
    }
}

/// A JS function that takes a [`JsMessage`], kept across calls.
pub type HandlerRef = Arc<JsFn>;

/// A JS message handler (sync or async) as a core [`Handler`].
pub struct JsHandler {
    function: HandlerRef,
    js: JsThread,
}

impl JsHandler {
    pub fn new(function: HandlerRef, js: JsThread) -> Self {
        Self { function, js }
    }
}

enum Step {
    Done,
    Stopped,
    /// The handler returned a promise for this message; the rest wait for it.
    Wait(String, Pending<UnknownReturnValue>, Vec<ConduitMessage>),
}

impl Handler for JsHandler {
    fn deliver(
        &self,
        batch: Vec<ConduitMessage>,
        settled: Settled,
        stop: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        let (function, js) = (self.function.clone(), self.js.clone());
        Box::pin(async move {
            let mut rest: VecDeque<ConduitMessage> = batch.into();
            while !rest.is_empty() {
                if stop.is_cancelled() {
                    return;
                }
                let chunk: Vec<ConduitMessage> = rest.drain(..rest.len().min(BATCH)).collect();
                // Written here, off the JS thread, and made into JS objects there in one step.
                let text = serde_json::to_string(&chunk).ok();
                let (function, settled_js, stop_js) =
                    (function.clone(), settled.clone(), stop.clone());
                let step = js
                    .run(move |env| {
                        call_handler(env, &function, chunk, text, &settled_js, &stop_js)
                    })
                    .await;
                match step {
                    Ok(Step::Done) => {}
                    Ok(Step::Stopped) | Err(_) => return,
                    Ok(Step::Wait(id, promise, remaining)) => {
                        let outcome = match promise.await {
                            Ok(_) => Outcome::Handled,
                            Err(why) => Outcome::Failed(why),
                        };
                        settled(&id, outcome);
                        for m in remaining.into_iter().rev() {
                            rest.push_front(m);
                        }
                    }
                }
            }
        })
    }
}

/// On the JS thread: calls the handler for each message until one returns a promise. `text`
/// is the chunk as a JSON array: the messages are made by one `JSON.parse` (the objects the
/// handler gets are the same either way), else one by one.
fn call_handler(
    env: &Env,
    function: &HandlerRef,
    chunk: Vec<ConduitMessage>,
    text: Option<String>,
    settled: &Settled,
    stop: &CancellationToken,
) -> Result<Step> {
    let handler = function.get(env)?;
    let parsed = text
        .and_then(|text| super::js::parse_json_array(env, &text))
        .filter(|array| array.len() as usize == chunk.len());
    let mut messages = chunk.into_iter().enumerate();
    while let Some((index, message)) = messages.next() {
        // stop() runs on this thread too: once it has returned, no call gets through.
        if stop.is_cancelled() {
            return Ok(Step::Stopped);
        }
        let id = message.id.clone();
        let made = parsed
            .as_ref()
            .and_then(|array| array.get::<Unknown>(index as u32).ok().flatten());
        // Whatever the handler throws is this message's failure, described without throwing
        // again: the next message is still handed over (see `js::call`).
        let called = match made {
            Some(object) => super::js::call(env, handler, object),
            None => super::js::call(env, handler, JsMessage::from(message)),
        };
        match called {
            Err(thrown) => settled(&id, Outcome::Failed(describe(&thrown))),
            Ok(returned) if returned.is_promise()? => match Pending::observe(env, returned) {
                Ok(promise) => {
                    return Ok(Step::Wait(id, promise, messages.map(|(_, m)| m).collect()));
                }
                Err(e) => settled(&id, Outcome::Failed(describe(&e))),
            },
            Ok(_) => settled(&id, Outcome::Handled),
        }
    }
    Ok(Step::Done)
}

/// A JS transport object (`poll`, `ack`, `connect`, `disconnect`, …) called from Rust.
pub struct JsTransport {
    object: Arc<PersistentObject>,
    name: String,
}

impl JsTransport {
    pub fn new(object: &Object<'_>, js: JsThread) -> Result<Self> {
        let name = super::js::string_property(object, "name").unwrap_or_else(|| "js".to_owned());
        Ok(Self {
            object: Arc::new(PersistentObject::new(object, js)?),
            name,
        })
    }

    /// The transport's `name`, read when it was adopted.
    pub fn transport_name(&self) -> &str {
        &self.name
    }

    pub fn object(&self) -> &Arc<PersistentObject> {
        &self.object
    }

    pub fn js(&self) -> &JsThread {
        self.object.js()
    }

    /// Calls `ack(ids)` right now, on the JS thread (from `stop()`); a returned promise is
    /// observed, so its rejection is never unhandled.
    pub fn ack_now(&self, env: &Env, ids: Vec<String>) -> Result<()> {
        self.object
            .call_method::<Value, Lenient>(env, "ack", json!(ids))
            .map(drop)
    }

    /// Calls `method(arg)` with JSON `arg` (or no argument) and awaits what it returns.
    pub async fn invoke(&self, method: &'static str, arg: Option<Value>) -> CoreResult<Value> {
        let object = self.object.clone();
        let settle = self
            .object
            .js()
            .run(move |env| match arg {
                Some(arg) => object.call_method::<Value, Json>(env, method, arg),
                None => object.call_method::<(), Json>(env, method, ()),
            })
            .await
            .map_err(|e| in_method(&self.name, method, e))?;
        let value = settle
            .resolve()
            .await
            .map_err(|e| in_method(&self.name, method, e))?;
        Ok(value.0)
    }

    /// Calls `disconnect()` right now, on the JS thread (from `stop()`).
    pub fn disconnect_now(&self, env: &Env) -> Result<()> {
        self.object
            .call_method::<(), Lenient>(env, "disconnect", ())
            .map(drop)
    }

    /// `connect(config)` with the JSON config the contract gives.
    pub async fn connect(&self, config: Value) -> CoreResult<()> {
        self.invoke("connect", Some(config)).await.map(drop)
    }
}

fn in_method(transport: &str, method: &str, err: CoreError) -> CoreError {
    match err {
        CoreError::Js(why) => {
            CoreError::Js(format!("transport {transport:?} {method}() failed: {why}"))
        }
        other => other,
    }
}

impl DirectSource for JsTransport {
    fn poll(&self, limit: u32, since: Option<String>) -> BoxFuture<'_, CoreResult<Page>> {
        Box::pin(async move {
            let mut options = json!({ "limit": limit });
            if let Some(since) = since {
                options["since"] = json!(since);
            }
            match self.invoke("poll", Some(options)).await? {
                Value::Array(rows) => Ok(Page::from_rows(rows, message::from_transport_object)),
                Value::Null => Ok(Page::default()),
                _ => Err(CoreError::Js(format!(
                    "transport {:?} poll() did not return an array",
                    self.name
                ))),
            }
        })
    }

    fn ack(&self, ids: Vec<String>) -> BoxFuture<'_, CoreResult<()>> {
        Box::pin(async move { self.invoke("ack", Some(json!(ids))).await.map(drop) })
    }

    fn name(&self) -> String {
        self.name.clone()
    }
}

/// A JS registry (`get`, `getActive`, `rotateKey`) called from Rust.
pub struct JsRegistry {
    object: Arc<PersistentObject>,
}

impl JsRegistry {
    pub fn new(object: &Object<'_>, js: JsThread) -> Result<Self> {
        Ok(Self {
            object: Arc::new(PersistentObject::new(object, js)?),
        })
    }

    async fn invoke(&self, method: &'static str, agent_id: Option<String>) -> CoreResult<Value> {
        let object = self.object.clone();
        let settle = self
            .object
            .js()
            .run(move |env| match agent_id {
                Some(id) => object.call_method::<String, Lenient>(env, method, id),
                None => object.call_method::<(), Lenient>(env, method, ()),
            })
            .await
            .map_err(|e| registry_error(method, e))?;
        Ok(settle
            .resolve()
            .await
            .map_err(|e| registry_error(method, e))?
            .0)
    }

    /// `get(agentId)` or `getActive()`: the credential object, or None.
    pub async fn credential(&self, agent_id: Option<&str>) -> CoreResult<Option<Value>> {
        let (method, arg) = match agent_id {
            Some(id) => ("get", Some(id.to_owned())),
            None => ("getActive", None),
        };
        match self.invoke(method, arg).await? {
            Value::Null => Ok(None),
            v @ Value::Object(_) => Ok(Some(v)),
            _ => Err(CoreError::Js(format!(
                "registry.{method}() returned something that is not a credential"
            ))),
        }
    }
}

fn registry_error(method: &str, err: CoreError) -> CoreError {
    match err {
        CoreError::Js(why) => CoreError::Js(format!("registry.{method}() failed: {why}")),
        other => other,
    }
}

impl Registry for JsRegistry {
    fn get(&self, agent_id: &str) -> BoxFuture<'_, CoreResult<Option<RegistryCredential>>> {
        let agent_id = agent_id.to_owned();
        Box::pin(async move {
            Ok(self
                .credential(Some(&agent_id))
                .await?
                .map(|c| RegistryCredential {
                    api_key: c.get("apiKey").and_then(Value::as_str).map(str::to_owned),
                    updated_at: c
                        .get("updatedAt")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                }))
        })
    }

    fn rotate_key(&self, agent_id: &str) -> BoxFuture<'_, CoreResult<Option<String>>> {
        let agent_id = agent_id.to_owned();
        Box::pin(async move {
            let answer = self.invoke("rotateKey", Some(agent_id)).await?;
            Ok(answer
                .get("newApiKey")
                .and_then(Value::as_str)
                .map(str::to_owned))
        })
    }
}

impl crate::core::runtime::CallerTransport for JsTransport {
    fn connect(&self, config: Value) -> BoxFuture<'_, CoreResult<()>> {
        Box::pin(JsTransport::connect(self, config))
    }
}

impl crate::core::runtime::CredentialSource for JsRegistry {
    fn credential(&self, agent_id: Option<&str>) -> BoxFuture<'_, CoreResult<Option<Value>>> {
        let agent_id = agent_id.map(str::to_owned);
        Box::pin(async move { JsRegistry::credential(self, agent_id.as_deref()).await })
    }
}

/// The caller's `createSseTransport` as the runtime's stream factory: the transport it makes
/// becomes an `SseConnectionService` whose messages go to the runtime's poller.
pub struct JsStreamFactory {
    factory: Arc<JsFn>,
    js: JsThread,
    /// The service made over the caller's transport, for the runtime handle to hand out.
    made: std::sync::Mutex<Option<Arc<SseConnection>>>,
}

impl JsStreamFactory {
    pub fn new(factory: Arc<JsFn>, js: JsThread) -> Self {
        Self {
            factory,
            js,
            made: std::sync::Mutex::default(),
        }
    }

    /// The service over the transport the factory made, once.
    pub fn take_made(&self) -> Option<Arc<SseConnection>> {
        crate::core::sync::lock(&self.made).take()
    }
}

impl crate::core::runtime::CallerStreamFactory for JsStreamFactory {
    fn open(
        &self,
        connect_config: Value,
        inbox: crate::core::runtime::StreamInbox,
    ) -> BoxFuture<'_, CoreResult<BoxFuture<'static, CoreResult<()>>>> {
        let factory = self.factory.clone();
        Box::pin(async move {
            let (service, started) = self
                .js
                .run(move |env| {
                    let created = factory.call(env, ()).map_err(|e| {
                        Error::new(
                            Status::GenericFailure,
                            format!("createSseTransport() failed: {}", describe(&e)),
                        )
                    })?;
                    let object = super::js::as_object(env, created)?.ok_or_else(|| {
                        Error::new(
                            Status::InvalidArg,
                            "createSseTransport() did not return a transport object".to_owned(),
                        )
                    })?;
                    let transport = Arc::new(JsTransport::new(&object, JsThread::new(env))?);
                    let name = transport.transport_name().to_owned();
                    let source = SseSource::Js {
                        transport,
                        connect_config,
                        unsubscribe: std::sync::Mutex::new(None),
                    };
                    let service = SseConnection::new(source, SseTarget::Poller(inbox), name);
                    let started = service.start(env, None)?;
                    Ok((service, started))
                })
                .await?;
            *crate::core::sync::lock(&self.made) = Some(service);
            let started: BoxFuture<'static, CoreResult<()>> =
                Box::pin(async move { started.await.map_err(|e| CoreError::Js(describe(&e))) });
            Ok(started)
        })
    }
}
