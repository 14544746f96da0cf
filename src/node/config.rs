//! Reading config objects from JavaScript, with a `TypeError` that names the field.
//!
//! Every constructor takes its config as an untyped value and reads it through [`Fields`],
//! so a wrong type is `TypeError: AgentPoller: config.pollIntervalMs must be a positive
//! number (got -5)`, never a napi conversion message, a silent default, or a crash. Values
//! are described by type only, never echoed, so an API key in the wrong field stays out
//! of the message.

use std::time::Duration;

use napi::Env;
use napi::bindgen_prelude::*;

use super::js::type_error;

/// A config object being read, for messages that say whose config it is.
pub struct Fields<'env> {
    env: &'env Env,
    object: Option<Object<'env>>,
    owner: &'static str,
}

impl<'env> Fields<'env> {
    /// `value` must be an object (or, when `optional`, undefined/null for "all defaults").
    pub fn new(
        env: &'env Env,
        owner: &'static str,
        value: Option<Unknown<'env>>,
        optional: bool,
    ) -> Result<Self> {
        let object = match value {
            None => None,
            Some(v) => match v.get_type()? {
                ValueType::Undefined | ValueType::Null => None,
                ValueType::Object => Some(unsafe { Object::from_napi_value(env.raw(), v.raw())? }),
                other => {
                    return Err(type_error(
                        env,
                        format!(
                            "{owner}: config must be an object (got {})",
                            type_name(other)
                        ),
                    ));
                }
            },
        };
        if object.is_none() && !optional {
            return Err(type_error(
                env,
                format!("{owner}: config must be an object"),
            ));
        }
        Ok(Self { env, object, owner })
    }

    fn fail(&self, field: &str, want: &str, got: Option<ValueType>) -> Error {
        let got = got
            .map(|t| format!(" (got {})", type_name(t)))
            .unwrap_or_default();
        type_error(
            self.env,
            format!("{}: config.{field} must be {want}{got}", self.owner),
        )
    }

    /// The field's value, `None` when it is absent, `undefined` or `null`.
    pub fn raw(&self, field: &str) -> Result<Option<Unknown<'env>>> {
        let Some(object) = &self.object else {
            return Ok(None);
        };
        let value: Unknown = object.get_named_property(field)?;
        Ok(match value.get_type()? {
            ValueType::Undefined | ValueType::Null => None,
            _ => Some(value),
        })
    }

    pub fn string(&self, field: &str) -> Result<Option<String>> {
        match self.raw(field)? {
            None => Ok(None),
            Some(v) if v.get_type()? == ValueType::String => {
                let s = unsafe { String::from_napi_value(self.env.raw(), v.raw())? };
                if s.is_empty() {
                    return Err(self.fail(field, "a non-empty string", None));
                }
                Ok(Some(s))
            }
            Some(v) => Err(self.fail(field, "a non-empty string", Some(v.get_type()?))),
        }
    }

    /// A string, empty allowed (a local agent's unused `apiKey`).
    pub fn any_string(&self, field: &str) -> Result<Option<String>> {
        match self.raw(field)? {
            None => Ok(None),
            Some(v) if v.get_type()? == ValueType::String => Ok(Some(unsafe {
                String::from_napi_value(self.env.raw(), v.raw())?
            })),
            Some(v) => Err(self.fail(field, "a string", Some(v.get_type()?))),
        }
    }

    /// Where the journal goes: a non-empty path, `false` for none; absent for the default
    /// location (see [`crate::core::journal::resolve`]).
    pub fn journal(&self, field: &str) -> Result<crate::core::journal::JournalSetting> {
        use crate::core::journal::JournalSetting;
        const WANT: &str = "a non-empty path string or false";
        match self.raw(field)? {
            None => Ok(JournalSetting::Default),
            Some(v) if v.get_type()? == ValueType::Boolean => {
                if unsafe { bool::from_napi_value(self.env.raw(), v.raw())? } {
                    Err(self.fail(field, WANT, Some(ValueType::Boolean)))
                } else {
                    Ok(JournalSetting::Off)
                }
            }
            Some(v) if v.get_type()? == ValueType::String => {
                match unsafe { String::from_napi_value(self.env.raw(), v.raw())? } {
                    path if path.is_empty() || path.contains('\0') => {
                        Err(self.fail(field, WANT, None))
                    }
                    path => Ok(JournalSetting::Path(path.into())),
                }
            }
            Some(v) => Err(self.fail(field, WANT, Some(v.get_type()?))),
        }
    }

    pub fn required_string(&self, field: &str) -> Result<String> {
        self.string(field)?
            .ok_or_else(|| self.fail(field, "a non-empty string", Some(ValueType::Undefined)))
    }

    /// An agent id: a non-empty string that the `X-Agent-Id` header can carry. The message
    /// never quotes the id (it may be anything, a key pasted in the wrong field included).
    pub fn agent_id(&self, field: &str, required: bool) -> Result<Option<String>> {
        let id = match required {
            true => Some(self.required_string(field)?),
            false => self.string(field)?,
        };
        if let Some(id) = &id
            && !crate::core::credentials::usable_agent_id(id)
        {
            return Err(self.fail(field, crate::core::credentials::AGENT_ID_RULE, None));
        }
        Ok(id)
    }

    pub fn required_agent_id(&self, field: &str) -> Result<String> {
        Ok(self.agent_id(field, true)?.unwrap_or_default())
    }

    /// A required agent id that also goes into a URL path segment: not `.` or `..`, which no
    /// URL can carry (normalisation resolves them, even percent-encoded).
    pub fn required_path_id(&self, field: &str) -> Result<String> {
        let id = self.required_agent_id(field)?;
        if !usable_in_path(&id) {
            return Err(self.fail(field, NOT_DOTS, None));
        }
        Ok(id)
    }

    /// A string that must parse as an http(s) URL.
    pub fn url(&self, field: &str, required: bool) -> Result<Option<String>> {
        let value = if required {
            Some(self.required_string(field)?)
        } else {
            self.string(field)?
        };
        if let Some(url) = &value
            && crate::core::signaldock::parse_base_url(url).is_err()
        {
            return Err(self.fail(field, "an http(s) URL", None));
        }
        Ok(value)
    }

    fn number(&self, field: &str, want: &str) -> Result<Option<f64>> {
        match self.raw(field)? {
            None => Ok(None),
            Some(v) if v.get_type()? == ValueType::Number => {
                let n = unsafe { f64::from_napi_value(self.env.raw(), v.raw())? };
                if n.is_finite() {
                    Ok(Some(n))
                } else {
                    Err(self.fail(field, want, None))
                }
            }
            Some(v) => Err(self.fail(field, want, Some(v.get_type()?))),
        }
    }

    /// Milliseconds > 0.
    pub fn positive_ms(&self, field: &str) -> Result<Option<Duration>> {
        const WANT: &str = "a positive number of milliseconds";
        match self.number(field, WANT)? {
            Some(n) if n > 0.0 && n <= MAX_MS => Ok(Some(Duration::from_secs_f64(n / 1000.0))),
            Some(_) => Err(self.fail(field, WANT, None)),
            None => Ok(None),
        }
    }

    /// Milliseconds >= 0 (0 meaning "disabled").
    pub fn non_negative_ms(&self, field: &str) -> Result<Option<Duration>> {
        const WANT: &str = "a number of milliseconds >= 0";
        match self.number(field, WANT)? {
            Some(n) if (0.0..=MAX_MS).contains(&n) => Ok(Some(Duration::from_secs_f64(n / 1000.0))),
            Some(_) => Err(self.fail(field, WANT, None)),
            None => Ok(None),
        }
    }

    /// A whole number >= 1.
    pub fn positive_count(&self, field: &str, max: u32) -> Result<Option<u32>> {
        let want = format!("a whole number from 1 to {max}");
        match self.number(field, &want)? {
            Some(n) if n >= 1.0 && n <= f64::from(max) && n.fract() == 0.0 => Ok(Some(n as u32)),
            Some(_) => Err(self.fail(field, &want, None)),
            None => Ok(None),
        }
    }

    pub fn string_array(&self, field: &str) -> Result<Option<Vec<String>>> {
        const WANT: &str = "an array of non-empty strings";
        let Some(value) = self.raw(field)? else {
            return Ok(None);
        };
        let object = match value.get_type()? {
            ValueType::Object => unsafe { Object::from_napi_value(self.env.raw(), value.raw())? },
            other => return Err(self.fail(field, WANT, Some(other))),
        };
        if !object.is_array()? {
            return Err(self.fail(field, WANT, None));
        }
        let mut items = Vec::new();
        for i in 0..object.get_array_length()? {
            let item: Unknown = object.get_element(i)?;
            if item.get_type()? != ValueType::String {
                return Err(self.fail(
                    &format!("{field}[{i}]"),
                    "a non-empty string",
                    Some(item.get_type()?),
                ));
            }
            let s = unsafe { String::from_napi_value(self.env.raw(), item.raw())? };
            if s.is_empty() {
                return Err(self.fail(&format!("{field}[{i}]"), "a non-empty string", None));
            }
            // Every string array is a list of ids that go into URL paths.
            if !usable_in_path(&s) {
                return Err(self.fail(&format!("{field}[{i}]"), NOT_DOTS, None));
            }
            items.push(s);
        }
        Ok(Some(items))
    }

    /// An object that has every one of `methods` as a function.
    pub fn object_with(&self, field: &str, methods: &[&str]) -> Result<Option<Object<'env>>> {
        let want = format!(
            "an object with {}",
            methods
                .iter()
                .map(|m| format!("{m}()"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let Some(value) = self.raw(field)? else {
            return Ok(None);
        };
        if value.get_type()? != ValueType::Object {
            return Err(self.fail(field, &want, Some(value.get_type()?)));
        }
        let object = unsafe { Object::from_napi_value(self.env.raw(), value.raw())? };
        if let Some(missing) = missing_method(&object, methods)? {
            return Err(self.fail(field, &format!("{want}; {missing}() is missing"), None));
        }
        Ok(Some(object))
    }

    pub fn function(&self, field: &str) -> Result<Option<Unknown<'env>>> {
        match self.raw(field)? {
            None => Ok(None),
            Some(v) if v.get_type()? == ValueType::Function => Ok(Some(v)),
            Some(v) => Err(self.fail(field, "a function", Some(v.get_type()?))),
        }
    }
}

const NOT_DOTS: &str = "an id usable in a URL path (not \".\" or \"..\")";

pub use crate::core::credentials::usable_in_path;

/// The first of `methods` that `object` lacks as a function.
pub fn missing_method<'a>(object: &Object<'_>, methods: &[&'a str]) -> Result<Option<&'a str>> {
    for method in methods {
        let value: Unknown = object.get_named_property(method)?;
        if value.get_type()? != ValueType::Function {
            return Ok(Some(method));
        }
    }
    Ok(None)
}

/// The largest interval accepted: tokio timers are exact to ~2 years; nobody needs more.
const MAX_MS: f64 = 365.0 * 24.0 * 3600.0 * 1000.0;

pub fn type_name(t: ValueType) -> &'static str {
    match t {
        ValueType::Undefined => "undefined",
        ValueType::Null => "null",
        ValueType::Boolean => "boolean",
        ValueType::Number => "number",
        ValueType::String => "string",
        ValueType::Symbol => "symbol",
        ValueType::Object => "object",
        ValueType::Function => "function",
        ValueType::External => "external",
        ValueType::BigInt => "bigint",
        _ => "unknown",
    }
}
