//! One WebSocket connection: the only task that writes to its socket.
//!
//! The loop waits on five things at once: shutdown (after the drain's delay: the outbox is
//! written out, then close `1001` with a resume position), the outbox (frames from the hub),
//! inbound messages, the heartbeat, and the auth timer (the handshake window, the expiry of
//! the connection's JWT, or the re-auth window after it). Replies to requests are written
//! directly, in request order; event frames come through the bounded outbox and go out in one flush per
//! wake-up. A subscription's `init` (and the replay of a resume) goes through the outbox too,
//! queued by `Hub::subscribe` under the collection's log lock, so nothing the hub queues for
//! the subscription can precede it.
//!
//! Token lifecycle (as Directus): when the JWT expires, the client gets `TOKEN_EXPIRED`, its
//! subscriptions are suspended (they stay registered with a spec that receives nothing) and
//! it has `--auth-timeout` to send a new `auth`. A valid one recompiles the subscriptions
//! under the new token; otherwise `AUTH_TIMEOUT`, then the socket closes (in `public` mode
//! it goes on with the public permissions instead). Every inbound message also passes a
//! per-connection token bucket (`--max-messages-per-second`).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::SinkExt;
use tokio::time::{Instant, Interval, MissedTickBehavior, Sleep};

use super::ConnectionSlot;
use crate::app::AppState;
use crate::auth::{authenticate, AuthError, Identity, Permissions, Principal};
use crate::config::AuthMode;
use crate::hub::{NewSubscription, Resume, SubscribeError};
use crate::metrics::CloseReason;
use crate::outbox::{Drained, Frame, Live, Outbox};
use crate::protocol::{
    auth_ok, close, error_frame, parse_client, pong, server_ping, unsubscribe_ack, AuthRequest,
    ClientMessage, Credentials, ErrorCode, ProtocolError, SubscribeRequest, Uid,
};
use crate::registry::{compile, Dialect, Spec, SpecContext, SubHandle};

/// How long a closing frame may take to go out before the socket is dropped anyway.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a resume from a position this node has not reached yet waits for it.
const RESUME_CATCH_UP: Duration = Duration::from_secs(2);
/// How often that wait checks.
const RESUME_POLL: Duration = Duration::from_millis(10);

/// Expiries further away than this are not armed (a timer that far out would never fire in
/// the life of a connection, and tokio's timers have an upper bound).
const MAX_EXPIRY_TIMER: Duration = Duration::from_secs(365 * 86400);

/// A token bucket over a connection's inbound messages: `rate` tokens per second, holding at
/// most `burst`. The burst is a second's worth plus `--max-subscriptions`, so a client that
/// reconnects and re-sends all its subscriptions at once (as @directus/sdk does) is not cut
/// off.
struct RateLimit {
    tokens: f64,
    burst: f64,
    last: Instant,
}

impl RateLimit {
    fn new(rate: u32, max_subscriptions: usize) -> Self {
        let burst = f64::from(rate) + max_subscriptions as f64;
        RateLimit {
            tokens: burst,
            burst,
            last: Instant::now(),
        }
    }

    /// Takes a token, or says how long until the next one.
    fn take(&mut self, rate: u32) -> Result<(), Duration> {
        let rate = f64::from(rate);
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

/// One live subscription of this connection.
struct LocalSub {
    /// The uid as sent, for replies that echo its type.
    request: SubscribeRequest,
    /// The uid as subscription frames carry it (always a string).
    uid_str: Option<Arc<str>>,
    /// Where it lives in the registry.
    handle: SubHandle,
    /// Its `collection` metric label.
    label: Arc<str>,
}

enum AuthState {
    /// Handshake mode: waiting for the first message, which must be `auth`.
    Pending,
    /// Authenticated (or anonymous in public mode).
    Authed(Arc<Principal>),
}

/// What woke the session loop.
enum Wake {
    Shutdown,
    Outbox,
    Inbound(Option<Result<Message, axum::Error>>),
    Heartbeat,
    Deadline(Deadline),
}

/// What the session's auth timer stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deadline {
    /// Handshake mode: the first message must be `auth` before it.
    Handshake,
    /// The connection's JWT expires.
    TokenExpiry,
    /// After `TOKEN_EXPIRED`: the end of the window for a new `auth`.
    Reauth,
}

/// What the loop does after handling something.
enum Flow {
    Continue,
    Close(CloseReason),
}

/// Why a write failed.
enum WriteError {
    /// The socket is gone.
    Socket,
    /// The client did not take the bytes within the write timeout.
    Timeout,
}

/// The state of one connection.
pub struct Session {
    state: Arc<AppState>,
    peer: SocketAddr,
    outbox: Arc<Outbox>,
    auth: AuthState,
    subs: Vec<LocalSub>,
    /// A non-auth message arrived since the last heartbeat ping (any message proves life).
    heard: bool,
    /// A heartbeat ping was sent and not yet followed by a full silent period.
    pinged: bool,
    heartbeat: Option<Interval>,
    /// The one timer of the auth state, whichever applies (they never overlap): the handshake
    /// window, the JWT's expiry, or the re-auth window after `TOKEN_EXPIRED`. One field and one
    /// `select!` branch rather than three keeps every idle connection smaller.
    deadline: Option<(Deadline, Pin<Box<Sleep>>)>,
    /// Inbound message rate limit; `None` when `--max-messages-per-second` is 0.
    rate: Option<RateLimit>,
    /// Frees this connection's place under `--max-connections` when the session ends.
    _slot: ConnectionSlot,
}

impl Session {
    /// A session for a freshly upgraded connection. `identity` is the one from the upgrade
    /// URL's token, if any.
    pub fn new(
        state: Arc<AppState>,
        identity: Option<Identity>,
        peer: SocketAddr,
        slot: ConnectionSlot,
    ) -> Self {
        let config = &state.config;
        let outbox = Arc::new(Outbox::new(config.outbox_messages, config.outbox_bytes));
        let expires_at = identity.as_ref().and_then(|i| i.expires_at);
        let auth = match (identity, config.auth_mode) {
            (Some(identity), _) => AuthState::Authed(identity.principal),
            (None, AuthMode::Handshake) => AuthState::Pending,
            (None, _) => AuthState::Authed(state.anonymous.clone()),
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
            heartbeat: None,
            deadline: handshake,
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

    /// Arms the timer for the credential's expiry (with `None`: no timer at all). Replaces any
    /// other auth timer: a new identity ends the handshake or re-auth window.
    fn arm_expiry(&mut self, expires_at: Option<SystemTime>) {
        self.deadline = expires_at.and_then(|at| {
            let left = at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            (left <= MAX_EXPIRY_TIMER)
                .then(|| (Deadline::TokenExpiry, Box::pin(tokio::time::sleep(left))))
        });
    }

    fn start_heartbeat(&mut self) {
        if let Some(period) = self.state.config.heartbeat_period {
            let mut interval = tokio::time::interval_at(Instant::now() + period, period);
            interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
            self.heartbeat = Some(interval);
        }
    }

    /// Runs the connection to its end and cleans up after it.
    pub async fn run(mut self, mut socket: WebSocket) {
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

    async fn serve(&mut self, socket: &mut WebSocket) -> CloseReason {
        let shutdown = self.state.shutdown.clone();
        let outbox = self.outbox.clone();
        loop {
            let pending = matches!(self.auth, AuthState::Pending);
            // The wait is kept apart from the handling: an idle connection's task holds only
            // the small state of this select; handling (writes with timeouts, subscribe) is
            // boxed for the moment it runs. That keeps idle connections small.
            let wake = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Wake::Shutdown,
                _ = outbox.ready() => Wake::Outbox,
                message = socket.recv() => Wake::Inbound(message),
                kind = async { match self.deadline.as_mut() { Some((kind, d)) => { d.await; *kind } None => std::future::pending().await } }, if self.deadline.is_some() => Wake::Deadline(kind),
                _ = async { if let Some(h) = self.heartbeat.as_mut() { h.tick().await; } }, if self.heartbeat.is_some() && !pending => Wake::Heartbeat,
            };
            if let Flow::Close(reason) = Box::pin(self.on_wake(socket, wake)).await {
                return reason;
            }
        }
    }

    async fn on_wake(&mut self, socket: &mut WebSocket, wake: Wake) -> Flow {
        match wake {
            Wake::Shutdown => Flow::Close(self.close_for_shutdown(socket).await),
            Wake::Outbox => match self.flush_outbox(socket).await {
                Ok(Drained::Frames) => Flow::Continue,
                Ok(Drained::Overflowed) | Err(WriteError::Timeout) => {
                    tracing::info!(peer = %self.peer, "closing slow consumer");
                    self.close_with(
                        socket,
                        Some((close::SLOW_CONSUMER, "slow consumer: outbox full")),
                    )
                    .await;
                    Flow::Close(CloseReason::SlowConsumer)
                }
                Err(WriteError::Socket) => Flow::Close(CloseReason::Error),
            },
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
                match self.send(socket, server_ping().into()).await {
                    Ok(()) => Flow::Continue,
                    Err(_) => Flow::Close(CloseReason::Error),
                }
            }
        }
    }

    /// Writes everything queued, then flushes once. The batch lives only for the write, so an
    /// idle connection holds no frame buffer.
    async fn flush_outbox(&self, socket: &mut WebSocket) -> Result<Drained, WriteError> {
        let mut batch: Vec<Frame> = Vec::new();
        if self.outbox.drain(&mut batch) == Drained::Overflowed {
            return Ok(Drained::Overflowed);
        }
        if batch.is_empty() {
            return Ok(Drained::Frames);
        }
        let write_timeout = self.state.config.write_timeout;
        let mut bytes = 0usize;
        // The stamps are kept aside so the frames' text can be moved into the socket rather
        // than cloned (a clone is an atomic increment on a count every receiver shares).
        let stamps: Vec<Live> = batch.iter().filter_map(|f| f.live).collect();
        let write = async {
            for frame in batch {
                if frame.live.is_some() {
                    bytes += frame.text.len();
                }
                socket
                    .feed(Message::Text(frame.text))
                    .await
                    .map_err(|_| WriteError::Socket)?;
            }
            socket.flush().await.map_err(|_| WriteError::Socket)
        };
        match tokio::time::timeout(write_timeout, write).await {
            Ok(result) => result?,
            Err(_) => {
                self.outbox.mark_slow();
                return Err(WriteError::Timeout);
            }
        }
        let metrics = &self.state.metrics;
        let now = std::time::Instant::now();
        let live = stamps.len() as u64;
        // Local histograms: one atomic merge per flush instead of per frame.
        let delivery_latency = metrics.delivery_latency.local();
        let outbox_to_socket = metrics.outbox_to_socket.local();
        for stamp in &stamps {
            delivery_latency.observe(now.saturating_duration_since(stamp.received).as_secs_f64());
            outbox_to_socket.observe(now.saturating_duration_since(stamp.queued).as_secs_f64());
        }
        delivery_latency.flush();
        outbox_to_socket.flush();
        metrics.deliveries.inc_by(live);
        metrics.delivered_bytes.inc_by(bytes as u64);
        Ok(Drained::Frames)
    }

    /// Writes a reply. Frames the hub queued before it go out first, so a reply never
    /// overtakes events that happened before the request (no event of a subscription after
    /// its `unsubscribe` ack or after the `init` of the subscription replacing it).
    async fn send(&self, socket: &mut WebSocket, text: Utf8Bytes) -> Result<(), WriteError> {
        // An overflow found here is left to the loop: the outbox keeps it and its wake-up.
        self.flush_outbox(socket).await?;
        let result = tokio::time::timeout(
            self.state.config.write_timeout,
            socket.send(Message::Text(text)),
        )
        .await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(WriteError::Socket),
            Err(_) => {
                self.outbox.mark_slow();
                Err(WriteError::Timeout)
            }
        }
    }

    async fn send_error(
        &self,
        socket: &mut WebSocket,
        error: &ProtocolError,
    ) -> Result<(), WriteError> {
        self.state.metrics.protocol_error(error.code);
        self.send(socket, error.to_frame().into()).await
    }

    /// Sends a close frame (`None`: without a status code, as Directus does) and gives it a
    /// moment to leave.
    async fn close_with(&self, socket: &mut WebSocket, frame: Option<(u16, &'static str)>) {
        let frame = frame.map(|(code, reason)| CloseFrame {
            code,
            reason: reason.into(),
        });
        let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, socket.send(Message::Close(frame))).await;
    }

    /// The drain's close (see [`crate::shutdown`]): the resume position is read first, then
    /// everything queued — at least every event up to that position — is written out, then
    /// `1001` tells the client to reconnect elsewhere and where to resume.
    async fn close_for_shutdown(&self, socket: &mut WebSocket) -> CloseReason {
        let position = crate::shutdown::resume_position(
            &self.state,
            self.subs.iter().map(|s| s.request.collection.as_str()),
        );
        match self.flush_outbox(socket).await {
            Ok(Drained::Frames) => {}
            Ok(Drained::Overflowed) | Err(WriteError::Timeout) => {
                self.close_with(
                    socket,
                    Some((close::SLOW_CONSUMER, "slow consumer: outbox full")),
                )
                .await;
                return CloseReason::SlowConsumer;
            }
            Err(WriteError::Socket) => return CloseReason::Error,
        }
        let frame = CloseFrame {
            code: close::GOING_AWAY,
            reason: crate::shutdown::close_reason(position.as_ref()).into(),
        };
        let _ = tokio::time::timeout(
            CLOSE_WRITE_TIMEOUT,
            socket.send(Message::Close(Some(frame))),
        )
        .await;
        CloseReason::Shutdown
    }

    async fn fail_handshake(&self, socket: &mut WebSocket) -> CloseReason {
        let frame = error_frame(
            "auth",
            ErrorCode::AuthFailed,
            "Authentication handshake failed.",
            None,
        );
        self.state.metrics.protocol_error(ErrorCode::AuthFailed);
        let _ = self.send(socket, frame.into()).await;
        self.close_with(socket, None).await;
        CloseReason::AuthFailed
    }

    async fn on_socket_error(&self, socket: &mut WebSocket, error: axum::Error) -> Flow {
        let inner = error.into_inner();
        let too_big = inner
            .downcast_ref::<tokio_tungstenite::tungstenite::Error>()
            .is_some_and(|e| matches!(e, tokio_tungstenite::tungstenite::Error::Capacity(_)));
        if too_big {
            tracing::debug!(peer = %self.peer, "inbound message over the frame limit");
            self.close_with(socket, Some((close::TOO_BIG, "message too big")))
                .await;
            return Flow::Close(CloseReason::FrameTooBig);
        }
        tracing::debug!(peer = %self.peer, error = %inner, "socket error");
        Flow::Close(CloseReason::Client)
    }

    async fn on_message(&mut self, socket: &mut WebSocket, message: Message) -> Flow {
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
            Message::Close(_) => return Flow::Close(CloseReason::Client),
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
            ClientMessage::Items { uid } => {
                let error = ProtocolError::new(
                    "items",
                    ErrorCode::Unsupported,
                    "Tidings has no item storage: \"items\" requests are not supported.",
                    uid,
                );
                self.reply_error(socket, &error).await
            }
        }
    }

    async fn reply(&self, socket: &mut WebSocket, text: String) -> Flow {
        match self.send(socket, text.into()).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Close(CloseReason::Error),
        }
    }

    async fn reply_error(&self, socket: &mut WebSocket, error: &ProtocolError) -> Flow {
        match self.send_error(socket, error).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Close(CloseReason::Error),
        }
    }

    /// Authenticates an `auth` message's credentials. Refusals are logged and counted here;
    /// the client only ever learns `AUTH_FAILED`.
    fn lookup(&self, credentials: &Credentials) -> Option<Identity> {
        let result = match credentials {
            Credentials::AccessToken(token) => authenticate(
                &self.state.config.tokens,
                self.state.config.jwt.as_deref(),
                token,
            ),
            Credentials::Unsupported | Credentials::Missing => Err(AuthError::UnknownToken),
        };
        match result {
            Ok(identity) => Some(identity),
            Err(error) => {
                tracing::debug!(peer = %self.peer, %error, "auth refused");
                self.state.metrics.auth_rejected(&error);
                None
            }
        }
    }

    /// Makes `identity` the connection's: its permissions, and its expiry timer. Ends a
    /// pending re-auth window.
    fn set_identity(&mut self, identity: Identity) {
        self.auth = AuthState::Authed(identity.principal);
        self.arm_expiry(identity.expires_at);
    }

    /// Public rights (anonymous), no expiry: where a `public`-mode connection falls back to.
    fn become_anonymous(&mut self) {
        self.auth = AuthState::Authed(self.state.anonymous.clone());
        self.deadline = None;
    }

    async fn on_handshake(&mut self, socket: &mut WebSocket, request: AuthRequest) -> Flow {
        let Some(identity) = self.lookup(&request.credentials) else {
            return Flow::Close(self.fail_handshake(socket).await);
        };
        // Also ends the handshake window.
        self.set_identity(identity);
        self.start_heartbeat();
        self.reply(socket, auth_ok(request.uid.as_ref())).await
    }

    /// The JWT expired: suspend every subscription (before telling the client, so no event
    /// frame follows the notice), drop to the rights of an unauthenticated connection, send
    /// `TOKEN_EXPIRED` and open the re-auth window.
    async fn on_token_expired(&mut self, socket: &mut WebSocket) -> Flow {
        self.deadline = None;
        tracing::debug!(peer = %self.peer, "token expired");
        for sub in &mut self.subs {
            let spec = Spec::suspended(
                &sub.request.collection,
                self.state.config.key_field(&sub.request.collection),
            );
            sub.handle = self.state.registry.replace(
                &sub.handle,
                spec,
                sub.uid_str.clone(),
                self.outbox.clone(),
            );
        }
        self.auth = AuthState::Authed(match self.state.config.auth_mode {
            AuthMode::Public => self.state.anonymous.clone(),
            AuthMode::Handshake | AuthMode::Strict => {
                Arc::new(Principal::anonymous(Permissions::default()))
            }
        });
        self.deadline = Some((
            Deadline::Reauth,
            Box::pin(tokio::time::sleep(self.state.config.auth_timeout)),
        ));
        let error = ProtocolError::new("auth", ErrorCode::TokenExpired, "Token expired.", None);
        self.reply_error(socket, &error).await
    }

    /// No valid `auth` within the window after `TOKEN_EXPIRED`: `AUTH_TIMEOUT`, then close,
    /// or in `public` mode go on with the public permissions.
    async fn on_reauth_deadline(&mut self, socket: &mut WebSocket) -> Flow {
        self.deadline = None;
        let error = ProtocolError::new(
            "auth",
            ErrorCode::AuthTimeout,
            "Authentication timed out.",
            None,
        );
        if let Flow::Close(reason) = self.reply_error(socket, &error).await {
            return Flow::Close(reason);
        }
        if self.state.config.auth_mode != AuthMode::Public {
            self.close_with(socket, None).await;
            return Flow::Close(CloseReason::AuthTimeout);
        }
        self.become_anonymous();
        self.recompile_subscriptions(socket).await
    }

    async fn on_reauth(&mut self, socket: &mut WebSocket, request: AuthRequest) -> Flow {
        match self.lookup(&request.credentials) {
            Some(identity) => {
                self.set_identity(identity);
                if let Flow::Close(reason) = self.reply(socket, auth_ok(request.uid.as_ref())).await
                {
                    return Flow::Close(reason);
                }
            }
            None => {
                let error = ProtocolError::new(
                    "auth",
                    ErrorCode::AuthFailed,
                    "Authentication failed.",
                    request.uid.clone(),
                );
                if let Flow::Close(reason) = self.reply_error(socket, &error).await {
                    return Flow::Close(reason);
                }
                if self.state.config.auth_mode != AuthMode::Public {
                    self.close_with(socket, None).await;
                    return Flow::Close(CloseReason::AuthFailed);
                }
                // Public mode: the connection goes on with public rights only.
                self.become_anonymous();
            }
        }
        self.recompile_subscriptions(socket).await
    }

    /// Re-applies the current principal's permissions to every existing subscription (a
    /// re-auth can widen or narrow them); ones no longer allowed are dropped with an error.
    async fn recompile_subscriptions(&mut self, socket: &mut WebSocket) -> Flow {
        let AuthState::Authed(principal) = &self.auth else {
            return Flow::Continue;
        };
        let principal = principal.clone();
        let mut errors = Vec::new();
        for sub in std::mem::take(&mut self.subs) {
            let key_field = self
                .state
                .config
                .key_field(&sub.request.collection)
                .to_string();
            let ctx = SpecContext {
                principal: &principal,
                limits: &self.state.config.filter_limits,
                key_field: &key_field,
            };
            match compile(&sub.request, &ctx) {
                Ok(spec) => {
                    let handle = self.state.registry.replace(
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

    fn drop_sub(&self, sub: &LocalSub) {
        self.state.registry.remove(&sub.handle);
        self.state
            .metrics
            .subscriptions
            .with_label_values(&[&*sub.label])
            .dec();
    }

    async fn on_subscribe(&mut self, socket: &mut WebSocket, request: SubscribeRequest) -> Flow {
        let AuthState::Authed(principal) = &self.auth else {
            return Flow::Continue;
        };
        let principal = principal.clone();
        let config = &self.state.config;
        let uid_str = request.uid.as_ref().map(Uid::as_subscription_str);
        let replaces = uid_str.is_some() && self.subs.iter().any(|s| s.uid_str == uid_str);
        if !replaces && self.subs.len() >= config.max_subscriptions {
            let error = ProtocolError::new(
                "subscribe",
                ErrorCode::LimitExceeded,
                format!(
                    "Too many subscriptions on this connection (the limit is {}).",
                    config.max_subscriptions
                ),
                request.uid.clone(),
            );
            return self.reply_error(socket, &error).await;
        }
        let key_field = config.key_field(&request.collection).to_string();
        let ctx = SpecContext {
            principal: &principal,
            limits: &config.filter_limits,
            key_field: &key_field,
        };
        let spec = match compile(&request, &ctx) {
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
        // Tidings stores no items: a collection subscription's init is an empty list; event
        // and item subscriptions get an init without data (Directus omits it for `event`).
        let init_data =
            (spec.item.is_none() && request.event.is_none() && spec.dialect == Dialect::Flat)
                .then_some("[]");
        let label = self.state.metrics.collections.label(&spec.collection);
        let mut sub = Box::new(NewSubscription {
            spec,
            uid: uid_str.clone(),
            outbox: self.outbox.clone(),
            init_data,
            resume: Resume::Fresh,
            history_trusted: self.state.backplane.is_ready(),
        });
        let mut waited = Duration::ZERO;
        let handle = loop {
            // A client resuming from a node that is ahead of this one waits for this node to
            // catch up rather than be replayed the difference twice; past the wait, its
            // position counts as lost.
            sub.resume = match &request.since {
                None => Resume::Fresh,
                Some(_) if waited >= RESUME_CATCH_UP => Resume::Lost,
                Some(since) => Resume::After(since.clone()),
            };
            match self.state.hub.subscribe(sub) {
                Ok((handle, replayed)) => {
                    self.state.metrics.replayed_frames.inc_by(replayed as u64);
                    break handle;
                }
                Err(SubscribeError::Ahead(back)) => {
                    sub = back;
                    tokio::time::sleep(RESUME_POLL).await;
                    waited += RESUME_POLL;
                }
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

    async fn on_unsubscribe(&mut self, socket: &mut WebSocket, uid: Option<Uid>) -> Flow {
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
