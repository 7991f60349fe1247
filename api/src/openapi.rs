use crate::routes::{accounts, auth, commands, health, transfers};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(title = "Ledger", description = "Event-sourced ledger: command and query API. Errors are application/problem+json; the last path segment of `type` is the code."),
    paths(
        auth::register, auth::login,
        accounts::open, accounts::list, accounts::get, accounts::deposit, accounts::withdraw, accounts::transactions,
        transfers::create, transfers::get,
        commands::get,
        health::healthz, health::readyz,
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
        );
    }
}
