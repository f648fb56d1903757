//! The auth lifecycle of a session: the handshake (first message must be `auth`), the
//! expiry of the connection's JWT (`TOKEN_EXPIRED`, subscriptions suspended, a re-auth
//! window), a re-auth, and the recompile of every subscription under the new rights.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{Flow, Session, Socket};
use crate::auth::{AuthError, Identity, Principal};
use crate::config::AuthMode;
use crate::metrics::CloseReason;
use crate::protocol::{auth_ok, error_frame, AuthRequest, Credentials, ErrorCode, ProtocolError};

/// Expiries further away than this are not armed (a timer that far out would never fire in
/// the life of a connection, and tokio's timers have an upper bound).
const MAX_EXPIRY_TIMER: Duration = Duration::from_secs(365 * 86400);

pub(super) enum AuthState {
    /// Handshake mode: waiting for the first message, which must be `auth`.
    Pending,
    /// Authenticated (or anonymous in public mode).
    Authed(Arc<Principal>),
}

/// What the session's auth timer stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Deadline {
    /// Handshake mode: the first message must be `auth` before it.
    Handshake,
    /// The connection's JWT expires.
    TokenExpiry,
    /// After `TOKEN_EXPIRED`: the end of the window for a new `auth`.
    Reauth,
}

impl Session {
    /// Arms the timer for the credential's expiry (with `None`: no timer at all). Replaces any
    /// other auth timer: a new identity ends the handshake or re-auth window.
    pub(super) fn arm_expiry(&mut self, expires_at: Option<SystemTime>) {
        self.deadline = expires_at.and_then(|at| {
            let left = at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            (left <= MAX_EXPIRY_TIMER)
                .then(|| (Deadline::TokenExpiry, Box::pin(tokio::time::sleep(left))))
        });
    }

    /// Authenticates an `auth` message's credentials. Refusals are logged and counted here;
    /// the client only ever learns `AUTH_FAILED`.
    async fn authenticate(&self, credentials: &Credentials) -> Option<Identity> {
        let result = match credentials {
            Credentials::AccessToken(token) => self.state.auth.authenticate(token).await,
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
        self.auth = AuthState::Authed(self.state.auth.anonymous().clone());
        self.deadline = None;
    }

    pub(super) async fn on_handshake<S: Socket>(
        &mut self,
        socket: &mut S,
        request: AuthRequest,
    ) -> Flow {
        let Some(identity) = self.authenticate(&request.credentials).await else {
            return Flow::Close(self.fail_handshake(socket).await);
        };
        // Also ends the handshake window.
        self.set_identity(identity);
        self.start_heartbeat();
        self.reply(socket, auth_ok(request.uid.as_ref())).await
    }

    /// The handshake failed (a first message other than a valid `auth`, or none in time):
    /// `AUTH_FAILED`, then a close without a code, as Directus.
    pub(super) async fn fail_handshake<S: Socket>(&self, socket: &mut S) -> CloseReason {
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

    /// The JWT expired: suspend every subscription (before telling the client, so no event
    /// frame follows the notice), drop to the rights of an unauthenticated connection, send
    /// `TOKEN_EXPIRED` and open the re-auth window.
    pub(super) async fn on_token_expired<S: Socket>(&mut self, socket: &mut S) -> Flow {
        self.deadline = None;
        tracing::debug!(peer = %self.peer, "token expired");
        self.suspend_subscriptions();
        self.auth = AuthState::Authed(match self.state.config.auth_mode {
            AuthMode::Public => self.state.auth.anonymous().clone(),
            AuthMode::Handshake | AuthMode::Strict => self.state.auth.nobody().clone(),
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
    pub(super) async fn on_reauth_deadline<S: Socket>(&mut self, socket: &mut S) -> Flow {
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

    pub(super) async fn on_reauth<S: Socket>(
        &mut self,
        socket: &mut S,
        request: AuthRequest,
    ) -> Flow {
        match self.authenticate(&request.credentials).await {
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
}
