//! The world a bench runs in: users, their accounts, a funded hub and a
//! merchant, all made through the public API.

use crate::client::Http;
use crate::Args;
use anyhow::{bail, Context};
use futures::stream::{self, StreamExt, TryStreamExt};
use serde_json::{json, Value};
use std::time::Instant;
use uuid::Uuid;

pub struct Account {
    pub id: Uuid,
    /// Index into `World::tokens`: the owner's access token.
    pub owner: usize,
}

pub struct World {
    pub tokens: Vec<String>,
    pub accounts: Vec<Account>,
    /// Well funded: the source of every account's money, and the debited
    /// account of `hot-debit`.
    pub hub: Account,
    /// Credited by every transfer of `hot`.
    pub merchant: Account,
    /// Keys are unique per run, so a bench can run again on the same server.
    pub run_id: String,
}

/// What each account starts with, and what the hub keeps for `hot-debit`.
const ACCOUNT_FUNDS: &str = "1000.00";
const HUB_DEPOSIT: &str = "900000000000.00";

impl World {
    pub async fn build(http: &Http, args: &Args) -> anyhow::Result<World> {
        let started = Instant::now();
        let run_id = Uuid::now_v7().simple().to_string();
        let users = args.users.max(2);
        // Registration hashes a password (argon2id): the server bounds those,
        // so a few at a time is as fast as many.
        let tokens: Vec<String> = stream::iter(0..users)
            .map(|i| {
                let http = http.clone();
                let run_id = run_id.clone();
                async move {
                    let email = format!("bench-{run_id}-{i}@example.com");
                    let password = "bench password 123";
                    http.must_post("/v1/auth/register", None, None, &json!({ "email": email, "password": password }))
                        .await?;
                    let login = http
                        .must_post("/v1/auth/login", None, None, &json!({ "email": email, "password": password }))
                        .await?;
                    login["access_token"].as_str().map(str::to_owned).context("login answered no access_token")
                }
            })
            .buffered(4)
            .try_collect()
            .await?;
        let open = |owner: usize, n: usize| {
            let http = http.clone();
            let token = tokens[owner].clone();
            let run_id = run_id.clone();
            async move {
                let key = format!("{run_id}-open-{owner}-{n}");
                let body =
                    http.must_post("/v1/accounts", Some(&token), Some(&key), &json!({ "currency": "EUR" })).await?;
                let id = account_id(&body)?;
                anyhow::Ok(Account { id, owner })
            }
        };
        let hub = open(0, usize::MAX).await?;
        let merchant = open(1, usize::MAX).await?;
        let accounts: Vec<Account> = stream::iter(0..args.accounts)
            .map(|n| open(n % users, n))
            .buffer_unordered(args.connections.clamp(1, 64))
            .try_collect()
            .await?;
        http.must_post(
            &format!("/v1/accounts/{}/deposits", hub.id),
            Some(&tokens[0]),
            Some(&format!("{run_id}-hub-deposit")),
            &json!({ "amount": HUB_DEPOSIT }),
        )
        .await?;
        // Every account gets its funds from the hub, a thousand per request.
        for (chunk_no, chunk) in accounts.chunks(1000).enumerate() {
            let transfers: Vec<Value> = chunk
                .iter()
                .enumerate()
                .map(|(i, a)| {
                    json!({ "key": format!("{run_id}-fund-{chunk_no}-{i}"), "from_account": hub.id,
                            "to_account": a.id, "amount": ACCOUNT_FUNDS })
                })
                .collect();
            let body = http
                .must_post(
                    "/v1/transfers/batch",
                    Some(&tokens[0]),
                    Some(&format!("{run_id}-fund-{chunk_no}")),
                    &json!({ "transfers": transfers, "atomic": true }),
                )
                .await?;
            if body["results"].as_array().map(Vec::len) != Some(chunk.len()) {
                bail!("funding batch answered {body}");
            }
        }
        println!(
            "set-up: {} users, {} accounts funded with {ACCOUNT_FUNDS} EUR each, in {:.1} s",
            users,
            accounts.len(),
            started.elapsed().as_secs_f64()
        );
        Ok(World { tokens, accounts, hub, merchant, run_id })
    }

    pub fn token(&self, account: &Account) -> &str {
        &self.tokens[account.owner]
    }
}

fn account_id(body: &Value) -> anyhow::Result<Uuid> {
    body["account_id"].as_str().and_then(|s| s.parse().ok()).with_context(|| format!("no account_id in {body}"))
}
