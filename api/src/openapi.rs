use crate::live;
use crate::routes::{accounts, admin, api_keys, audit, auth, commands, health, holds, me, orders, transfers};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(title = "Ledger", description = "Event-sourced ledger: command and query API. Errors are application/problem+json; the last path segment of `type` is the code.\n\nAuthenticate with `Authorization: Bearer <access token>` (from /v1/auth/login), `Authorization: Bearer lk_...` (an API key), or the `ledger_access` cookie (browser mode: unsafe methods also need `X-CSRF-Token` equal to the `ledger_csrf` cookie)."),
    paths(
        auth::register, auth::login, auth::refresh, auth::logout, auth::logout_all, auth::sessions,
        auth::revoke_session, auth::change_password, auth::two_factor_setup, auth::two_factor_confirm,
        auth::two_factor_disable,
        api_keys::create, api_keys::list, api_keys::revoke,
        me::me, me::activity,
        accounts::open, accounts::list, accounts::get, accounts::deposit, accounts::withdraw, accounts::transactions, accounts::statement,
        transfers::create, transfers::get, transfers::batch,
        holds::place, holds::capture, holds::release, holds::get, holds::of_account,
        orders::create, orders::cancel, orders::accept, orders::refund, orders::get, orders::list,
        commands::get,
        admin::users, admin::user, audit::export, admin::block, admin::unblock, admin::change_role, admin::forget, admin::freeze, admin::unfreeze,
        live::live,
        health::healthz, health::readyz,
    ),
    modifiers(&SecuritySchemes),
    security(("bearer" = []), ("api_key" = []), ("cookie" = [])),
)]
pub struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("lk_...")
                    .description(Some("An API key with the read and/or write scope"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "cookie",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                "ledger_access",
                "Browser mode; unsafe methods also need X-CSRF-Token equal to the ledger_csrf cookie",
            ))),
        );
    }
}
