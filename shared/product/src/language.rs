//! BCP 47 language tags, as used for the keys of product names and descriptions.
//!
//! The catalog accepts the subset of BCP 47 that product data uses: a language, an optional
//! script, an optional region and optional variants (`ko`, `en`, `zh-CN`, `zh-Hant-TW`,
//! `sr-Latn`, `es-419`, `de-CH-1996`). Extensions and private-use tags are refused, so every
//! stored key is something a translation system understands. Tags are compared and stored in
//! their canonical case (`zh-cn` becomes `zh-CN`), so one language cannot be stored twice.

/// The canonical form of `tag`, or why it is not a language tag this catalog accepts.
///
/// # Errors
/// A lowercase description of the first problem found.
pub fn canonicalize(tag: &str) -> Result<String, String> {
    if tag.is_empty() {
        return Err("language tag must not be empty".into());
    }
    if tag.len() > 35 {
        return Err("language tag is longer than 35 characters".into());
    }
    let mut subtags = tag.split('-').peekable();
    let mut out = Vec::new();

    let language = subtags.next().unwrap_or_default();
    if !(is_alpha(language) && (2..=3).contains(&language.len())) {
        return Err(format!(
            "{tag:?} is not a BCP 47 language tag: it must start with a 2 or 3 letter language code"
        ));
    }
    out.push(language.to_ascii_lowercase());

    if let Some(script) = subtags.next_if(|s| s.len() == 4 && is_alpha(s)) {
        let mut chars = script.chars();
        let first = chars.next().map(|c| c.to_ascii_uppercase());
        out.push(
            first
                .into_iter()
                .chain(chars.map(|c| c.to_ascii_lowercase()))
                .collect(),
        );
    }
    if let Some(region) =
        subtags.next_if(|s| (s.len() == 2 && is_alpha(s)) || (s.len() == 3 && is_digit(s)))
    {
        out.push(region.to_ascii_uppercase());
    }
    for variant in subtags {
        let valid = ((5..=8).contains(&variant.len()) && is_alphanumeric(variant))
            || (variant.len() == 4
                && variant.starts_with(|c: char| c.is_ascii_digit())
                && is_alphanumeric(variant));
        if !valid {
            return Err(format!(
                "{tag:?} is not a BCP 47 language tag: subtag {variant:?} is not a script, \
                 region or variant (extensions and private use are not accepted)"
            ));
        }
        out.push(variant.to_ascii_lowercase());
    }
    Ok(out.join("-"))
}

fn is_alpha(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphabetic())
}

fn is_digit(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn is_alphanumeric(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::canonicalize;

    #[test]
    fn common_tags_are_accepted_in_canonical_case() {
        for (input, canonical) in [
            ("ko", "ko"),
            ("en", "en"),
            ("ja", "ja"),
            ("zh-CN", "zh-CN"),
            ("zh-cn", "zh-CN"),
            ("ZH-hant-tw", "zh-Hant-TW"),
            ("sr-Latn", "sr-Latn"),
            ("es-419", "es-419"),
            ("de-CH-1996", "de-CH-1996"),
            ("fil", "fil"),
        ] {
            assert_eq!(canonicalize(input).as_deref(), Ok(canonical), "{input}");
        }
    }

    #[test]
    fn malformed_tags_are_refused_with_a_reason() {
        for input in [
            "",
            "k",
            "korean",
            "en_US",
            "en-",
            "-en",
            "en--US",
            "en-U",
            "12",
            "en-x-private",
            "en-US-u-ca-gregory",
            "한국어",
        ] {
            let error = canonicalize(input).expect_err(input);
            assert!(!error.is_empty());
        }
    }
}
