//! Opaque page tokens and change-log cursors.
//!
//! Both are URL-safe base64 of a short versioned text, so they can change form later without
//! breaking a caller that stored one. A page token is a keyset position (the last code
//! returned) plus a fingerprint of the filters it was issued for; a cursor is a change-log
//! position (transaction id and sequence number), with the snapshot of a watch "from now"
//! while that watch still leaves entries out.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use mall_grpc::ServiceError;

use crate::store::{CommittedBefore, ListFilter, LogPosition};

/// The token of the page after `last_code` under `filter`.
pub fn page_token(last_code: &str, filter: &ListFilter) -> String {
    URL_SAFE_NO_PAD.encode(format!("p1|{:016x}|{last_code}", fingerprint(filter)))
}

/// The code a page token continues after.
///
/// # Errors
/// INVALID_ARGUMENT (`page_token`) when it is malformed or was issued for other filters.
pub fn parse_page_token(token: &str, filter: &ListFilter) -> Result<String, ServiceError> {
    let malformed = || {
        ServiceError::invalid(
            "page_token",
            "is not a token returned by ListProducts; start again with an empty page_token",
        )
    };
    let text = decode(token).ok_or_else(malformed)?;
    let mut parts = text.splitn(3, '|');
    let (Some("p1"), Some(print), Some(code)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(malformed());
    };
    if print != format!("{:016x}", fingerprint(filter)) {
        return Err(ServiceError::invalid(
            "page_token",
            "was issued for other filters; send the same filters as the request that returned \
             it, or start again with an empty page_token",
        ));
    }
    Ok(code.to_owned())
}

/// The ListPendingProducts token of the page after `last_code`.
pub fn pending_page_token(last_code: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("q1|{last_code}"))
}

/// The code a ListPendingProducts page token continues after.
///
/// # Errors
/// INVALID_ARGUMENT (`page_token`) when it is malformed.
pub fn parse_pending_page_token(token: &str) -> Result<String, ServiceError> {
    decode(token)
        .and_then(|text| text.strip_prefix("q1|").map(str::to_owned))
        .ok_or_else(|| {
            ServiceError::invalid(
                "page_token",
                "is not a token returned by ListPendingProducts; start again with an empty \
                 page_token",
            )
        })
}

/// Most running transactions a cursor's snapshot may name (PostgreSQL's `max_connections`
/// bounds them; this bounds what a malformed cursor costs to parse).
const MAX_SNAPSHOT_RUNNING: usize = 10_000;

/// The cursor of change-log position `position`: `c2|xid|seq`. While a watch "from now" still
/// leaves out entries that committed before its call (`filter`, when entries after `position`
/// may be among them), the cursor carries that snapshot too, `c3|xid|seq|xmin|xmax|running`,
/// so a watch resumed from it leaves out the same entries.
pub fn cursor(position: LogPosition, filter: Option<&CommittedBefore>) -> String {
    let text = match filter.filter(|before| before.may_follow(position)) {
        Some(before) => {
            let (xmin, xmax, running) = before.parts();
            let running: Vec<String> = running.iter().map(i64::to_string).collect();
            format!(
                "c3|{}|{}|{xmin}|{xmax}|{}",
                position.xid,
                position.seq,
                running.join(",")
            )
        }
        None => format!("c2|{}|{}", position.xid, position.seq),
    };
    URL_SAFE_NO_PAD.encode(text)
}

/// The position in a cursor, and the snapshot of the watch it was issued by when that watch
/// still left entries out. Cursors issued before the log was ordered by transaction id
/// (`c1|seq`) name entries whose `xid` is 0, and still resume where they were issued.
///
/// # Errors
/// INVALID_ARGUMENT (`start_cursor`) when it is malformed.
pub fn parse_cursor(cursor: &str) -> Result<(LogPosition, Option<CommittedBefore>), ServiceError> {
    let number = |s: &str| s.parse::<i64>().ok().filter(|n| *n >= 0);
    decode(cursor)
        .and_then(|text| {
            if let Some(seq) = text.strip_prefix("c1|") {
                let position = LogPosition {
                    xid: 0,
                    seq: number(seq)?,
                };
                return Some((position, None));
            }
            if let Some(rest) = text.strip_prefix("c2|") {
                let (xid, seq) = rest.split_once('|')?;
                let position = LogPosition {
                    xid: number(xid)?,
                    seq: number(seq)?,
                };
                return Some((position, None));
            }
            let mut parts = text.strip_prefix("c3|")?.split('|');
            let mut next = || parts.next().and_then(number);
            let position = LogPosition {
                xid: next()?,
                seq: next()?,
            };
            let (xmin, xmax) = (next()?, next()?);
            let running = parts.next()?;
            let running: Vec<i64> = if running.is_empty() {
                Vec::new()
            } else {
                running
                    .split(',')
                    .take(MAX_SNAPSHOT_RUNNING + 1)
                    .map(number)
                    .collect::<Option<_>>()?
            };
            if parts.next().is_some() || running.len() > MAX_SNAPSHOT_RUNNING {
                return None;
            }
            Some((position, Some(CommittedBefore::new(xmin, xmax, running)?)))
        })
        .ok_or_else(|| {
            ServiceError::invalid(
                "start_cursor",
                "is not a cursor returned by WatchProductChanges",
            )
        })
}

fn decode(token: &str) -> Option<String> {
    String::from_utf8(URL_SAFE_NO_PAD.decode(token).ok()?).ok()
}

/// FNV-1a of the filters: stable across processes and versions, unlike `std`'s hasher.
fn fingerprint(filter: &ListFilter) -> u64 {
    let text = format!(
        "{}\u{0}{}\u{0}{}\u{0}{}",
        filter.product_type.as_deref().unwrap_or(""),
        filter.brand.as_deref().unwrap_or(""),
        filter.status.unwrap_or(0),
        filter
            .updated_after
            .map(|t| t.to_string())
            .unwrap_or_default(),
    );
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_token_carries_its_position_and_filters() {
        let filter = ListFilter {
            brand: Some("Maison".into()),
            ..ListFilter::default()
        };
        let token = page_token("AP-10|x", &filter);
        assert_eq!(parse_page_token(&token, &filter).expect("valid"), "AP-10|x");
        let other = ListFilter::default();
        assert!(parse_page_token(&token, &other).is_err());
        assert!(parse_page_token("garbage!", &filter).is_err());
        assert!(parse_page_token(&cursor(LogPosition { xid: 0, seq: 3 }, None), &filter).is_err());
    }

    #[test]
    fn a_pending_page_token_is_not_a_list_token() {
        let token = pending_page_token("AP-1");
        assert_eq!(parse_pending_page_token(&token).expect("valid"), "AP-1");
        assert!(parse_pending_page_token(&page_token("AP-1", &ListFilter::default())).is_err());
        assert!(parse_page_token(&token, &ListFilter::default()).is_err());
    }

    #[test]
    fn a_cursor_carries_a_log_position() {
        let position = LogPosition { xid: 7, seq: 42 };
        assert_eq!(
            parse_cursor(&cursor(position, None)).expect("valid"),
            (position, None)
        );
        assert_eq!(
            parse_cursor(&URL_SAFE_NO_PAD.encode("c1|42")).expect("an earlier cursor"),
            (LogPosition { xid: 0, seq: 42 }, None)
        );
        assert!(parse_cursor("").is_err());
        assert!(parse_cursor(&URL_SAFE_NO_PAD.encode("c1|-4")).is_err());
        assert!(parse_cursor(&URL_SAFE_NO_PAD.encode("c2|4")).is_err());
        assert!(parse_cursor(&URL_SAFE_NO_PAD.encode("c2|-1|4")).is_err());
        assert!(parse_cursor(&page_token("x", &ListFilter::default())).is_err());
    }

    #[test]
    fn a_cursor_carries_the_snapshot_of_a_watch_from_now_while_it_matters() {
        let before = CommittedBefore::new(5, 12, vec![9, 6]).expect("a snapshot");
        let early = LogPosition { xid: 7, seq: 42 };
        let (position, filter) = parse_cursor(&cursor(early, Some(&before))).expect("valid");
        assert_eq!(position, early);
        let filter = filter.expect("entries after it may have committed before the call");
        assert_eq!(filter, before);
        assert!(filter.contains(8) && !filter.contains(9) && !filter.contains(12));
        // Past the snapshot's xmax no entry can be one it leaves out: a plain cursor.
        let late = LogPosition { xid: 12, seq: 50 };
        assert_eq!(
            parse_cursor(&cursor(late, Some(&before))).expect("valid"),
            (late, None)
        );
        let none_running = CommittedBefore::new(5, 5, vec![]).expect("a snapshot");
        let (_, filter) =
            parse_cursor(&cursor(LogPosition { xid: 4, seq: 1 }, Some(&none_running)))
                .expect("valid");
        assert_eq!(filter, Some(none_running));
        for bad in [
            "c3|7|42|5|12",
            "c3|7|42|12|5|",
            "c3|7|42|5|12|13",
            "c3|7|42|5|12|x",
            "c3|7|42|5|12|6|",
        ] {
            assert!(
                parse_cursor(&URL_SAFE_NO_PAD.encode(bad)).is_err(),
                "{bad} is malformed"
            );
        }
    }
}
