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

/// The JSON text of [`to_json`]`(attributes)` (`{}` for none), written straight from the
/// `Struct`: the write path stores every product's attributes this way, and building a
/// `serde_json::Value` first cost an allocation per key and value.
pub fn to_json_text(attributes: Option<&Struct>) -> String {
    serde_json::to_string(&as_json(attributes))
        .expect("strings, numbers, booleans, lists and maps always serialize")
}

/// `attributes` as the JSON object [`to_json_text`] writes (`{}` for none), to serialize
/// wherever the caller writes (PostgreSQL's write path: straight into the statement).
pub fn as_json(attributes: Option<&Struct>) -> impl serde::Serialize + '_ {
    Object(attributes)
}

/// The attributes' object, or `{}`.
struct Object<'a>(Option<&'a Struct>);

impl serde::Serialize for Object<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(attributes) => Fields(attributes).serialize(serializer),
            None => serializer.collect_map(std::iter::empty::<(&str, &str)>()),
        }
    }
}

/// A `Struct` as a JSON object, serialized in place.
struct Fields<'a>(&'a Struct);

/// A `Value` as JSON, serialized in place; as [`value_to_json`] (a non-finite number, which
/// validation refuses, is `null`, as serde_json writes one).
struct AsJson<'a>(&'a Value);

impl serde::Serialize for Fields<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.fields.iter().map(|(k, v)| (k, AsJson(v))))
    }
}

impl serde::Serialize for AsJson<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match &self.0.kind {
            None | Some(Kind::NullValue(_)) => serializer.serialize_unit(),
            Some(Kind::NumberValue(n)) if n.is_finite() => serializer.serialize_f64(*n),
            Some(Kind::NumberValue(_)) => serializer.serialize_unit(),
            Some(Kind::StringValue(s)) => serializer.serialize_str(s),
            Some(Kind::BoolValue(b)) => serializer.serialize_bool(*b),
            Some(Kind::StructValue(s)) => Fields(s).serialize(serializer),
            Some(Kind::ListValue(l)) => serializer.collect_seq(l.values.iter().map(AsJson)),
        }
    }
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

    #[test]
    fn the_text_is_the_json_of_the_object_byte_for_byte() {
        let json: Map<String, Json> = serde_json::from_str(
            r#"{"sizes":["S","M"],"loft_degrees":10.5,"weight_g":320,"left_handed":false,
               "nested":{"b":[1,{"c":"q\"uote"}],"a":null},"ko":"울","tiny":1e-7}"#,
        )
        .expect("valid json");
        let mut attributes = from_json(&json);
        attributes.fields.insert(
            "nan".into(),
            Value {
                kind: Some(Kind::NumberValue(f64::NAN)),
            },
        );
        attributes
            .fields
            .insert("unset".into(), Value { kind: None });
        assert_eq!(
            to_json_text(Some(&attributes)),
            Json::Object(to_json(&attributes)).to_string()
        );
        assert_eq!(to_json_text(None), "{}");
    }
}
