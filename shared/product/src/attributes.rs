//! `google.protobuf.Struct` to and from JSON: attributes are stored as a JSON object, so the
//! database stays readable with ordinary tools.

use prost_types::{ListValue, Struct, Value, value::Kind};
use serde_json::{Map, Number, Value as Json};

/// The JSON object equal to `attributes`. Non-finite numbers, which validation refuses, become
/// `null`.
pub fn to_json(attributes: &Struct) -> Map<String, Json> {
    attributes
        .fields
        .iter()
        .map(|(k, v)| (k.clone(), value_to_json(v)))
        .collect()
}

/// The `Struct` equal to a JSON object.
pub fn from_json(object: &Map<String, Json>) -> Struct {
    Struct {
        fields: object
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    }
}

fn value_to_json(value: &Value) -> Json {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::NumberValue(n)) => Number::from_f64(*n).map_or(Json::Null, Json::Number),
        Some(Kind::StringValue(s)) => Json::String(s.clone()),
        Some(Kind::BoolValue(b)) => Json::Bool(*b),
        Some(Kind::StructValue(s)) => Json::Object(to_json(s)),
        Some(Kind::ListValue(l)) => Json::Array(l.values.iter().map(value_to_json).collect()),
    }
}

fn json_to_value(json: &Json) -> Value {
    let kind = match json {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(json_to_value).collect(),
        }),
        Json::Object(map) => Kind::StructValue(from_json(map)),
    };
    Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_struct_survives_a_round_trip_through_json() {
        let json: Map<String, Json> = serde_json::from_str(
            r#"{"sizes":["S","M"],"loft_degrees":10.5,"left_handed":false,"weight_g":320,"nested":{"a":null}}"#,
        )
        .expect("valid json");
        let back = to_json(&from_json(&json));
        assert_eq!(back["sizes"], serde_json::json!(["S", "M"]));
        assert_eq!(back["loft_degrees"], serde_json::json!(10.5));
        assert_eq!(back["left_handed"], serde_json::json!(false));
        assert_eq!(back["weight_g"].as_f64(), Some(320.0));
        assert_eq!(back["nested"], serde_json::json!({"a": null}));
    }
}
