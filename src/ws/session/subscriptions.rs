//! The subscriptions of one connection: subscribe (limits, uid replacement, the resume that
//! waits for this node to catch up), unsubscribe, and the swaps an auth change causes
//! (suspend on expiry, recompile on re-auth). Every change goes through the
//! [`Subscriptions`](crate::hub::Subscriptions) door of the connection's `WsState`.

use std::sync::Arc;
use std::time::Duration;

use super::auth::AuthState;
use super::{Flow, Session, Socket};
use crate::auth::Principal;
use crate::hub::{NewSubscription, Resume};
use crate::protocol::{unsubscribe_ack, ErrorCode, ProtocolError, SubscribeRequest, Uid};
use crate::read::capitalized;
use crate::registry::SubHandle;
use crate::subscription::{compile_configured, Dialect, Spec};

/// How long a resume from a position this node has not reached yet waits for it.
pub(super) const RESUME_CATCH_UP: Duration = Duration::from_secs(2);

/// One live subscription of this connection.
pub(super) struct LocalSub {
    /// The uid as sent, for replies that echo its type.
    request: SubscribeRequest,
    /// The uid as subscription frames carry it (always a string).
    uid_str: Option<Arc<str>>,
    /// Where it lives in the registry.
    handle: SubHandle,
    /// Its `collection` metric label.
    label: Arc<str>,
}

impl LocalSub {
    /// The collection it is on.
    pub(super) fn collection(&self) -> &str {
        &self.request.collection
    }
}

impl Session {
    /// Compiles `request` for `principal` under this connection's limits and key fields.
    fn compile(
        &self,
        request: &SubscribeRequest,
        principal: &Principal,
    ) -> Result<Spec, ProtocolError> {
        compile_configured(&self.state.config, request, principal)
    }

    /// Swaps every subscription for one that receives nothing (the token expired).
    pub(super) fn suspend_subscriptions(&mut self) {
        for sub in &mut self.subs {
            sub.handle = self.state.subscriptions.suspend(
                &sub.handle,
                self.state.config.key_field(&sub.request.collection),
                self.outbox.clone(),
            );
        }
    }

    /// Re-applies the current principal's permissions to every existing subscription (a
    /// re-auth can widen or narrow them); ones no longer allowed are dropped with an error.
    pub(super) async fn recompile_subscriptions<S: Socket>(&mut self, socket: &mut S) -> Flow {
        let AuthState::Authed(principal) = &self.auth else {
            return Flow::Continue;
        };
        let principal = principal.clone();
        let mut errors = Vec::new();
        for sub in std::mem::take(&mut self.subs) {
            match self.compile(&sub.request, &principal) {
                Ok(spec) => {
                    let handle = self.state.subscriptions.replace(
                        &sub.handle,
                        spec,
                        sub.uid_str.clone(),
                        self.outbox.clone(),
                    );
                    self.subs.push(LocalSub { handle, ..sub });
                }
                Err(error) => {
                    self.drop_sub(&sub);
                    errors.push(error);
                }
            }
        }
        for error in errors {
            if let Flow::Close(reason) = self.reply_error(socket, &error).await {
                return Flow::Close(reason);
            }
        }
        Flow::Continue
    }

    pub(super) fn drop_sub(&self, sub: &LocalSub) {
        self.state.subscriptions.remove(&sub.handle);
        self.outbox.forget(sub.handle.id());
        self.state
            .metrics
            .subscriptions
            .with_label_values(&[&*sub.label])
            .dec();
    }

    pub(super) async fn on_subscribe<S: Socket>(
        &mut self,
        socket: &mut S,
        request: SubscribeRequest,
    ) -> Flow {
        let AuthState::Authed(principal) = &self.auth else {
            return Flow::Continue;
        };
        let principal = principal.clone();
        let max_subscriptions = self.state.config.max_subscriptions;
        let uid_str = request.uid.as_ref().map(Uid::as_subscription_str);
        let replaces = uid_str.is_some() && self.subs.iter().any(|s| s.uid_str == uid_str);
        if !replaces && self.subs.len() >= max_subscriptions {
            let error = ProtocolError::new(
                "subscribe",
                ErrorCode::LimitExceeded,
                format!(
                    "Too many subscriptions on this connection (the limit is {max_subscriptions})."
                ),
                request.uid.clone(),
            );
            return self.reply_error(socket, &error).await;
        }
        let spec = match self.compile(&request, &principal) {
            Ok(spec) => spec,
            Err(error) => return self.reply_error(socket, &error).await,
        };
        // A reused uid replaces the earlier subscription(s) with that uid.
        if replaces {
            let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.subs)
                .into_iter()
                .partition(|s| s.uid_str == uid_str);
            self.subs = kept;
            for sub in &gone {
                self.drop_sub(sub);
            }
        }
        // A collection subscription's init is a list: the retained items on a collection
        // that keeps them (the hub takes the snapshot), else empty; event and item
        // subscriptions get an init without data (Directus omits it for `event`).
        let plain = request.event.is_none() && spec.dialect == Dialect::Flat;
        let listed = plain && spec.item.is_none();
        let init_data = listed.then_some("[]");
        let label = self.state.metrics.collections.label(&spec.collection);
        let subscriptions = &self.state.subscriptions;
        let sub = Box::new(NewSubscription {
            spec,
            uid: uid_str.clone(),
            outbox: self.outbox.clone(),
            init_data,
            snapshot: plain,
            // A client resuming from a node that is ahead of this one waits for this node
            // to catch up rather than be replayed the difference twice; past the wait, its
            // position counts as lost.
            resume: match &request.since {
                None => Resume::Fresh,
                Some(since) => Resume::After(since.clone()),
            },
            history_trusted: subscriptions.history_trusted(),
        });
        let (handle, _replayed) = match subscriptions.subscribe(sub, RESUME_CATCH_UP).await {
            Ok(done) => done,
            Err(e) => {
                let error = ProtocolError::new(
                    "subscribe",
                    ErrorCode::LimitExceeded,
                    format!("{}.", capitalized(&e.to_string())),
                    request.uid.clone(),
                );
                return self.reply_error(socket, &error).await;
            }
        };
        self.state
            .metrics
            .subscriptions
            .with_label_values(&[&*label])
            .inc();
        // Most connections hold one or two subscriptions: grow one at a time, not to four.
        self.subs.reserve_exact(1);
        self.subs.push(LocalSub {
            request,
            uid_str,
            handle,
            label,
        });
        Flow::Continue
    }

    pub(super) async fn on_unsubscribe<S: Socket>(
        &mut self,
        socket: &mut S,
        uid: Option<Uid>,
    ) -> Flow {
        let target = uid.as_ref().map(Uid::as_subscription_str);
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.subs)
            .into_iter()
            .partition(|s| target.is_none() || s.uid_str == target);
        self.subs = kept;
        for sub in &gone {
            self.drop_sub(sub);
        }
        self.reply(socket, unsubscribe_ack(uid.as_ref())).await
    }
}
