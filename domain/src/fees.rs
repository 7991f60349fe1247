//! Fee schedules: a rate with a minimum (and optional maximum) per kind of
//! movement. Fees round to the currency's minor units with banker's rounding
//! (half to even), so that over many fees the rounding does not drift one way.

use crate::events::TransferKind;
use crate::Currency;
use rust_decimal::{Decimal, RoundingStrategy};
use std::collections::HashMap;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FeeRule {
    /// A fraction: 0.005 is 0.5%.
    pub rate: Decimal,
    /// In the currency's major unit, e.g. 0.10.
    pub minimum: Decimal,
    pub maximum: Option<Decimal>,
}

impl FeeRule {
    /// The fee on `amount`: rate × amount rounded half-to-even to the minor
    /// unit, then at least `minimum` and at most `maximum` (both rounded the same way).
    pub fn fee_for(&self, amount: Decimal, currency: Currency) -> Decimal {
        let dp = currency.minor_units();
        let round = |v: Decimal| v.round_dp_with_strategy(dp, RoundingStrategy::MidpointNearestEven);
        let mut fee = round(amount * self.rate).max(round(self.minimum));
        if let Some(max) = self.maximum {
            fee = fee.min(round(max));
        }
        crate::money::to_minor_units(fee.max(Decimal::ZERO), currency)
    }
}

/// Fee rules by kind of movement; no rule, no fee.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FeeSchedule {
    rules: HashMap<TransferKind, FeeRule>,
}

impl FeeSchedule {
    pub fn rule(&self, kind: TransferKind) -> Option<FeeRule> {
        self.rules.get(&kind).copied()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Parses `kind:rate%[:minimum[:maximum]]`, comma-separated, e.g.
    /// `transfer:0.5%:0.10,withdrawal:1%:0.50:20`. Kinds: transfer, withdrawal.
    pub fn parse(text: &str) -> Result<FeeSchedule, String> {
        let mut rules = HashMap::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let fields: Vec<&str> = part.split(':').map(str::trim).collect();
            let kind = match fields[0] {
                "transfer" | "p2p" => TransferKind::Transfer,
                "withdrawal" => TransferKind::Withdrawal,
                other => return Err(format!("unknown kind {other:?}: fees apply to transfer or withdrawal")),
            };
            let rate_text = fields.get(1).ok_or_else(|| format!("{part:?} needs a rate, e.g. transfer:0.5%"))?;
            let rate = rate_text
                .strip_suffix('%')
                .and_then(|r| Decimal::from_str(r).ok())
                .filter(|r| *r >= Decimal::ZERO && *r <= Decimal::from(100))
                .ok_or_else(|| format!("{rate_text:?} is not a percentage between 0% and 100%"))?
                / Decimal::from(100);
            let money = |i: usize| -> Result<Option<Decimal>, String> {
                fields
                    .get(i)
                    .map(|t| {
                        Decimal::from_str(t)
                            .ok()
                            .filter(|d| *d >= Decimal::ZERO)
                            .ok_or(format!("{t:?} is not an amount"))
                    })
                    .transpose()
            };
            let minimum = money(2)?.unwrap_or(Decimal::ZERO);
            let maximum = money(3)?;
            if fields.len() > 4 {
                return Err(format!("{part:?} has too many fields"));
            }
            if rules.insert(kind, FeeRule { rate, minimum, maximum }).is_some() {
                return Err(format!("{} is given twice", fields[0]));
            }
        }
        Ok(FeeSchedule { rules })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn usd() -> Currency {
        Currency::from_code("USD").unwrap()
    }

    #[test]
    fn p2p_half_a_percent_with_a_ten_cent_minimum() {
        let schedule = FeeSchedule::parse("transfer:0.5%:0.10").unwrap();
        let rule = schedule.rule(TransferKind::Transfer).unwrap();
        assert_eq!(rule.fee_for(d("100.00"), usd()), d("0.50"));
        assert_eq!(rule.fee_for(d("5.00"), usd()), d("0.10"), "the minimum");
        assert_eq!(schedule.rule(TransferKind::Withdrawal), None, "no rule, no fee");
    }

    #[test]
    fn rounding_is_half_to_even_in_minor_units() {
        let rule = FeeRule { rate: d("0.005"), minimum: Decimal::ZERO, maximum: None };
        // 0.5% of 25.50 is 0.1275 -> 0.13; of 24.50 is 0.1225 -> 0.12 (ties go to even).
        assert_eq!(rule.fee_for(d("25.50"), usd()), d("0.13"));
        assert_eq!(rule.fee_for(d("24.50"), usd()), d("0.12"));
        assert_eq!(rule.fee_for(d("23.00"), usd()), d("0.12"), "0.115 -> 0.12");
        assert_eq!(rule.fee_for(d("21.00"), usd()), d("0.10"), "0.105 -> 0.10");
        let jpy = Currency::from_code("JPY").unwrap();
        assert_eq!(rule.fee_for(d("500"), jpy), d("2"), "2.5 yen -> 2");
        assert_eq!(rule.fee_for(d("700"), jpy), d("4"), "3.5 yen -> 4");
        assert_eq!(rule.fee_for(d("100.00"), usd()).to_string(), "0.50", "minor-unit digits");
    }

    #[test]
    fn a_maximum_caps_the_fee() {
        let schedule = FeeSchedule::parse("withdrawal:1%:0.50:20").unwrap();
        let rule = schedule.rule(TransferKind::Withdrawal).unwrap();
        assert_eq!(rule.fee_for(d("10000.00"), usd()), d("20.00"));
        assert_eq!(rule.fee_for(d("10.00"), usd()), d("0.50"));
    }

    #[test]
    fn bad_schedules_are_refused() {
        for bad in [
            "deposit:1%",
            "transfer",
            "transfer:1",
            "transfer:-1%",
            "transfer:1%:x",
            "transfer:1%,transfer:2%",
            "transfer:1%:1:2:3",
        ] {
            assert!(FeeSchedule::parse(bad).is_err(), "{bad}");
        }
        assert!(FeeSchedule::parse("").unwrap().is_empty());
    }
}
