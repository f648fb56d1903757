//! One WebSocket connection: the only task that writes to its socket.
//!
//! The loop waits on six things at once: shutdown, the outbox (frames from the hub), the
//! outbox's timer (the earliest slot a `max_rate` holds back falls due), inbound messages,
//! the auth timer (the handshake window, the expiry of the connection's JWT, or the re-auth
//! window after it) and the heartbeat. Replies to requests are written
//! directly, in request order; event frames come through the bounded outbox and go out in
//! one flush per wake-up (when the broker is busy, after a few yields that let more gather). A subscription's `init` (and the replay of a resume) goes through
//! the outbox too, queued by `Hub::subscribe` under the collection's log lock, so nothing the
//! hub queues for the subscription can precede it.
//!
//! Token lifecycle (as Directus): when the JWT expires, the client gets `TOKEN_EXPIRED`, its
//! subscriptions are suspended (they stay registered with a spec that receives nothing) and
//! it has `--auth-timeout` to send a new `auth`. A valid one recompiles the subscriptions
//! under the new token; otherwise `AUTH_TIMEOUT`, then the socket closes (in `public` mode
//! it goes on with the public permissions instead). Every inbound message also passes a
//! per-connection token bucket (`--max-messages-per-second`).
//!
//! The session is generic over its socket ([`Socket`]: any `Sink + Stream` of axum
//! messages), so its unit tests drive it through channels. Files, one concern each:
//! - this file: the state, the `select!` loop and the dispatch of what woke it;
//! - `writer`: outbox → socket, replies, close codes, delivery metrics;
//! - `auth`: handshake, expiry, re-auth and the recompile of subscriptions it causes;
//! - `subscriptions`: subscribe, unsubscribe, uid replacement, the resume wait;
//! - `items`: the `items` request (a read answered from the retained state).

mod auth;
mod items;
mod subscriptions;
mod writer;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use axum::extract::ws::{Message, Utf8Bytes};
use futures_util::{Sink, Stream, StreamExt};
use tokio::time::{Instant, Interval, MissedTickBehavior, Sleep};

use super::limits::ConnectionSlot;
use super::rate_limit::RateLimit;
use super::WsState;
use crate::auth::Identity;
use crate::config::AuthMode;
use crate::metrics::CloseReason;
use crate::outbox::Outbox;
use crate::protocol::{parse_client, pong, ClientMessage, ErrorCode, ProtocolError};
use auth::{AuthState, Deadline};
use subscriptions::LocalSub;

/// What a session runs over: axum's `WebSocket` in production, a pair of channels in unit
/// tests, a WebSocket over an in-memory byte stream when fuzzing.
pub trait Socket:
    Sink<Message> + Stream<Item = Result<Message, axum::Error>> + Unpin + Send
{
}

impl<T> Socket for T where
    T: Sink<Message> + Stream<Item = Result<Message, axum::Error>> + Unpin + Send
{
}

/// What woke the session loop.
enum Wake {
    Shutdown,
    Outbox,
    Inbound(Option<Result<Message, axum::Error>>),
    Heartbeat,
    Deadline(Deadline),
}

/// What the loop does after handling something.
enum Flow {
    Continue,
    Close(CloseReason),
}

/// Runs one connection's session over `socket` until it ends. `identity` is the one from the
/// upgrade URL's token, if any; `slot` is its place under the connection limits.
pub async fn drive<S: Socket>(
    state: Arc<WsState>,
    identity: Option<Identity>,
    peer: SocketAddr,
    slot: ConnectionSlot,
    socket: S,
) {
    Session::new(state, identity, peer, slot).run(socket).await
}

/// The state of one connection.
pub(super) struct Session {
    state: Arc<WsState>,
    peer: SocketAddr,
    outbox: Arc<Outbox>,
    auth: AuthState,
    subs: Vec<LocalSub>,
    /// A non-auth message arrived since the last heartbeat ping (any message proves life).
    heard: bool,
    /// A heartbeat ping was sent and not yet followed by a full silent period.
    pinged: bool,
    /// The last write of queued frames carried more than one (and fewer than
    /// `writer::GATHER_FRAMES`): the broker is busy, so the next wake-up gathers frames before
    /// writing (`writer::gather`).
    busy: bool,
    heartbeat: Option<Interval>,
    /// The one timer of the auth state, whichever applies (they never overlap): the handshake
    /// window, the JWT's expiry, or the re-auth window after `TOKEN_EXPIRED`. One field and one
    /// `select!` branch rather than three keeps every idle connection smaller.
    deadline: Option<(Deadline, Pin<Box<Sleep>>)>,
    /// When the earliest slot a `max_rate` holds back falls due ([`Outbox::next_due`]),
    /// re-armed before every wait; `None` while none is held (an idle connection keeps no
    /// timer).
    due: Option<Pin<Box<Sleep>>>,
    /// Inbound message rate limit; `None` when `--max-messages-per-second` is 0.
    rate: Option<RateLimit>,
    /// Frees this connection's place under `--max-connections` when the session ends.
    _slot: ConnectionSlot,
}

impl Session {
    /// A session for a freshly upgraded connection. `identity` is the one from the upgrade
    /// URL's token, if any.
    pub(super) fn new(
        state: Arc<WsState>,
        identity: Option<Identity>,
        peer: SocketAddr,
        slot: ConnectionSlot,
    ) -> Self {
        let config = &state.config;
        let outbox = Arc::new(Outbox::with_max_keys(
            config.outbox_messages,
            config.outbox_bytes,
            config.conflation_max_keys,
        ));
        let expires_at = identity.as_ref().and_then(|i| i.expires_at);
        let auth = match (identity, config.auth_mode) {
            (Some(identity), _) => AuthState::Authed(identity.principal),
            (None, AuthMode::Handshake) => AuthState::Pending,
            (None, _) => AuthState::Authed(state.auth.anonymous().clone()),
        };
        let rate = (config.max_messages_per_second > 0)
            .then(|| RateLimit::new(config.max_messages_per_second, config.max_subscriptions));
        let handshake = match auth {
            AuthState::Pending => Some((
                Deadline::Handshake,
                Box::pin(tokio::time::sleep(config.auth_timeout)),
            )),
            AuthState::Authed(_) => None,
        };
        let mut session = Session {
            state,
            peer,
            outbox,
            auth,
            subs: Vec::new(),
            heard: false,
            pinged: false,
            busy: false,
            heartbeat: None,
            deadline: handshake,
            due: None,
            rate,
            _slot: slot,
        };
        if expires_at.is_some() {
            session.arm_expiry(expires_at);
        }
        if matches!(session.auth, AuthState::Authed(_)) {
            session.start_heartbeat();
        }
        session
    }

    fn start_heartbeat(&mut self) {
        if let Some(period) = self.state.config.heartbeat_period {
            let mut interval = tokio::time::interval_at(Instant::now() + period, period);
            interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
            self.heartbeat = Some(interval);
        }
    }

    /// Runs the connection to its end and cleans up after it.
    pub(super) async fn run<S: Socket>(mut self, mut socket: S) {
        let metrics = self.state.metrics.clone();
        metrics.connections.inc();
        metrics.connections_opened.inc();
        tracing::debug!(peer = %self.peer, "session opened");
        let reason = self.serve(&mut socket).await;
        // A slow consumer is counted as one however the connection ends afterwards: a client
        // that hangs up before the close frame is still the slow consumer it was.
        let reason = if self.outbox.is_slow() {
            CloseReason::SlowConsumer
        } else {
            reason
        };
        for sub in std::mem::take(&mut self.subs) {
            self.drop_sub(&sub);
        }
        self.outbox.close();
        metrics.connections.dec();
        metrics.connection_closed(reason);
        tracing::debug!(peer = %self.peer, reason = reason.as_str(), "session closed");
    }

    async fn serve<S: Socket>(&mut self, socket: &mut S) -> CloseReason {
        let shutdown = self.state.shutdown.clone();
        let outbox = self.outbox.clone();
        loop {
            let pending = matches!(self.auth, AuthState::Pending);
            self.arm_due();
            // The wait is kept apart from the handling: an idle connection's task holds only
            // the small state of this select; handling (writes with timeouts, subscribe) is
            // boxed for the moment it runs. That keeps idle connections small.
            let wake = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Wake::Shutdown,
                _ = outbox.ready() => Wake::Outbox,
                _ = due(&mut self.due), if self.due.is_some() => Wake::Outbox,
                message = socket.next() => Wake::Inbound(message),
                kind = deadline(&mut self.deadline), if self.deadline.is_some() => {
                    Wake::Deadline(kind)
                }
                _ = heartbeat(&mut self.heartbeat), if self.heartbeat.is_some() && !pending => {
                    Wake::Heartbeat
                }
            };
            if let Flow::Close(reason) = Box::pin(self.on_wake(socket, wake)).await {
                return reason;
            }
        }
    }

    /// Sets the outbox timer to the earliest held slot (lock-free when none is held).
    fn arm_due(&mut self) {
        let Some(at) = self.outbox.next_due() else {
            self.due = None;
            return;
        };
        let at = Instant::from_std(at);
        match self.due.as_mut() {
            Some(sleep) if sleep.deadline() == at => {}
            Some(sleep) => sleep.as_mut().reset(at),
            None => self.due = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }

    async fn on_wake<S: Socket>(&mut self, socket: &mut S, wake: Wake) -> Flow {
        match wake {
            Wake::Shutdown => Flow::Close(self.close_for_shutdown(socket).await),
            Wake::Outbox => self.on_outbox(socket).await,
            Wake::Inbound(None) => Flow::Close(CloseReason::Client),
            Wake::Inbound(Some(Ok(message))) => self.on_message(socket, message).await,
            Wake::Inbound(Some(Err(e))) => self.on_socket_error(socket, e).await,
            Wake::Deadline(Deadline::Handshake) => Flow::Close(self.fail_handshake(socket).await),
            Wake::Deadline(Deadline::TokenExpiry) => self.on_token_expired(socket).await,
            Wake::Deadline(Deadline::Reauth) => self.on_reauth_deadline(socket).await,
            Wake::Heartbeat => {
                if self.pinged && !self.heard {
                    // Directus closes a silent client without a close code.
                    self.close_with(socket, None).await;
                    return Flow::Close(CloseReason::HeartbeatTimeout);
                }
                self.pinged = true;
                self.heard = false;
                match self
                    .send(socket, crate::protocol::server_ping().into())
                    .await
                {
                    Ok(()) => Flow::Continue,
                    Err(_) => Flow::Close(CloseReason::Error),
                }
            }
        }
    }

    async fn on_message<S: Socket>(&mut self, socket: &mut S, message: Message) -> Flow {
        let text = match message {
            Message::Text(text) => text,
            Message::Binary(bytes) => match Utf8Bytes::try_from(bytes) {
                Ok(text) => text,
                Err(_) => {
                    let error = ProtocolError::new(
                        "server",
                        ErrorCode::InvalidPayload,
                        "Unable to parse the incoming message.",
                        None,
                    );
                    return self.reply_error(socket, &error).await;
                }
            },
            Message::Ping(_) | Message::Pong(_) => return Flow::Continue,
            Message::Close(_) => {
                self.answer_close(socket).await;
                return Flow::Close(CloseReason::Client);
            }
        };
        // Checked before parsing: parsing is the work the limit protects.
        if let Some(rate) = self.rate.as_mut() {
            if let Err(wait) = rate.take(self.state.config.max_messages_per_second) {
                let error = ProtocolError::new(
                    "server",
                    ErrorCode::RequestsExceeded,
                    format!(
                        "Too many messages, retry after {}ms.",
                        wait.as_millis().max(1)
                    ),
                    None,
                );
                return self.reply_error(socket, &error).await;
            }
        }
        let parsed = parse_client(text.as_str());
        if matches!(self.auth, AuthState::Pending) {
            return match parsed {
                Ok(ClientMessage::Auth(request)) => self.on_handshake(socket, request).await,
                _ => Flow::Close(self.fail_handshake(socket).await),
            };
        }
        let message = match parsed {
            Ok(message) => message,
            Err(error) => return self.reply_error(socket, &error).await,
        };
        if !matches!(message, ClientMessage::Auth(_)) {
            self.heard = true;
        }
        match message {
            ClientMessage::Auth(request) => self.on_reauth(socket, request).await,
            ClientMessage::Subscribe(request) => self.on_subscribe(socket, request).await,
            ClientMessage::Unsubscribe { uid } => self.on_unsubscribe(socket, uid).await,
            ClientMessage::Ping { uid } => {
                // With the heartbeat off, Directus does not answer pings either.
                if self.state.config.heartbeat_period.is_some() {
                    return self.reply(socket, pong(uid.as_ref())).await;
                }
                Flow::Continue
            }
            ClientMessage::Pong | ClientMessage::Unknown => Flow::Continue,
            ClientMessage::Items(request) => self.on_items(socket, request).await,
        }
    }
}

/// Resolves when the auth timer fires, with what it stood for (pending without one).
async fn deadline(deadline: &mut Option<(Deadline, Pin<Box<Sleep>>)>) -> Deadline {
    match deadline.as_mut() {
        Some((kind, sleep)) => {
            sleep.await;
            *kind
        }
        None => std::future::pending().await,
    }
}

/// Resolves when the outbox timer fires (pending without one).
async fn due(due: &mut Option<Pin<Box<Sleep>>>) {
    match due.as_mut() {
        Some(sleep) => sleep.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Resolves on the next heartbeat tick (pending without a heartbeat).
async fn heartbeat(heartbeat: &mut Option<Interval>) {
    match heartbeat.as_mut() {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}
