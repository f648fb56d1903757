//! The `items` request: a `read` is answered from the retained state under the connection's
//! permissions ([`crate::read`]); `create`/`update`/`delete` stay `UNSUPPORTED` (Tidings
//! takes writes through its HTTP publish API, from the application that owns the data).

use super::auth::AuthState;
use super::{Flow, Session, Socket};
use crate::protocol::{items_frame, ErrorCode, ItemsAction, ItemsRequest, ProtocolError};
use crate::read::{read, ReadRequest};

impl Session {
    pub(super) async fn on_items<S: Socket>(
        &mut self,
        socket: &mut S,
        request: ItemsRequest,
    ) -> Flow {
        let AuthState::Authed(principal) = &self.auth else {
            return Flow::Continue;
        };
        if request.action == ItemsAction::Write {
            let error = ProtocolError::new(
                "items",
                ErrorCode::Unsupported,
                "Tidings only reads items over the socket: \"create\", \"update\" and \"delete\" are not supported (publish changes through the HTTP API).",
                request.uid,
            );
            return self.reply_error(socket, &error).await;
        }
        let uid = request.uid.clone();
        let answer = read(
            self.state.subscriptions.retained(),
            &self.state.config,
            principal,
            ReadRequest {
                collection: request.collection,
                query: request.query,
                id: request.id,
                ids: request.ids,
                uid: request.uid,
            },
        );
        match answer {
            Ok(view) => {
                let frame = items_frame(&view.data, view.meta.as_deref(), uid.as_ref());
                self.reply(socket, frame).await
            }
            Err(error) => self.reply_error(socket, &error).await,
        }
    }
}
