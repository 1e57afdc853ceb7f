//! The OpenAPI 3.1 document (`GET /api/v1/openapi.json`), built from the route tables each
//! service keeps beside its `configure` function. A test in the `fieldline` crate checks both
//! ways that the tables and the registered routes are the same set, so the document cannot
//! drift from the code.

use utoipa::openapi::{
    ComponentsBuilder, ContentBuilder, HttpMethod, InfoBuilder, ObjectBuilder, OpenApi,
    OpenApiBuilder, PathItem, PathsBuilder, Ref, RefOr, Required, ResponseBuilder, Schema, Type,
    path::{OperationBuilder, ParameterBuilder, ParameterIn},
    request_body::RequestBodyBuilder,
    security::{
        ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
    },
    tag::TagBuilder,
};

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Public,
    /// A device token (`fld_…`).
    Device,
    /// An API key with at least this scope.
    Read,
    Write,
    Admin,
    /// The platform admin key.
    PlatformAdmin,
}

impl Access {
    fn describe(self) -> &'static str {
        match self {
            Access::Public => "No credentials.",
            Access::Device => "A device token (`fld_…`).",
            Access::Read => "An API key with scope `read` (or higher).",
            Access::Write => "An API key with scope `write` (or higher).",
            Access::Admin => "An API key with scope `admin`.",
            Access::PlatformAdmin => "The platform admin key.",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }

    fn http(self) -> HttpMethod {
        match self {
            Method::Get => HttpMethod::Get,
            Method::Post => HttpMethod::Post,
            Method::Put => HttpMethod::Put,
            Method::Patch => HttpMethod::Patch,
            Method::Delete => HttpMethod::Delete,
        }
    }
}

/// `application/json`, the body of most writes.
pub const JSON: &[&str] = &["application/json"];

/// One route of the public API.
#[derive(Debug, Clone, Copy)]
pub struct RouteDoc {
    pub method: Method,
    /// As registered with actix: `/api/v1/devices/{id}`.
    pub path: &'static str,
    pub summary: &'static str,
    pub access: Access,
    /// Query parameters: name and description.
    pub query: &'static [(&'static str, &'static str)],
    /// Media types of the request body; empty for none.
    pub body: &'static [&'static str],
    /// Status of a success.
    pub success: u16,
}

impl RouteDoc {
    pub const fn new(
        method: Method,
        path: &'static str,
        summary: &'static str,
        access: Access,
    ) -> Self {
        Self {
            method,
            path,
            summary,
            access,
            query: &[],
            body: &[],
            success: match method {
                Method::Delete => 204,
                _ => 200,
            },
        }
    }

    pub const fn query(self, query: &'static [(&'static str, &'static str)]) -> Self {
        Self { query, ..self }
    }

    pub const fn body(self, body: &'static [&'static str]) -> Self {
        Self { body, ..self }
    }

    pub const fn success(self, success: u16) -> Self {
        Self { success, ..self }
    }
}

/// One service's routes, under its name (the document's tag).
pub struct ServiceDoc {
    pub service: &'static str,
    pub routes: &'static [RouteDoc],
}

/// The query parameters of a keyset-paged listing.
pub const PAGING: [(&str, &str); 2] = [
    ("limit", "page size, 1 to 1000 (default 100)"),
    ("cursor", "`page.next_cursor` of the previous page"),
];

fn operation_id(route: &RouteDoc) -> String {
    let mut id = route.method.as_str().to_ascii_lowercase();
    for part in route.path.split('/').filter(|part| !part.is_empty()) {
        id.push('_');
        id.extend(
            part.chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
                .map(|c| if c == '-' { '_' } else { c }),
        );
    }
    id
}

fn response(description: &str, schema: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name(schema)))
                .build(),
        )
        .build()
}

fn operation(service: &str, route: &RouteDoc) -> utoipa::openapi::path::Operation {
    let mut builder = OperationBuilder::new()
        .operation_id(Some(operation_id(route)))
        .summary(Some(route.summary))
        .description(Some(route.access.describe()))
        .tag(service);
    for name in route
        .path
        .split('/')
        .filter_map(|part| part.strip_prefix('{').and_then(|p| p.strip_suffix('}')))
    {
        builder = builder.parameter(
            ParameterBuilder::new()
                .name(name)
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .schema(Some(ObjectBuilder::new().schema_type(Type::String))),
        );
    }
    for (name, description) in route.query {
        builder = builder.parameter(
            ParameterBuilder::new()
                .name(*name)
                .parameter_in(ParameterIn::Query)
                .required(Required::False)
                .description(Some(*description))
                .schema(Some(ObjectBuilder::new().schema_type(Type::String))),
        );
    }
    if !route.body.is_empty() {
        let mut body = RequestBodyBuilder::new().required(Some(Required::True));
        for media in route.body {
            body = body.content(*media, ContentBuilder::new().build());
        }
        builder = builder.request_body(Some(body.build()));
    }
    let success = if route.success == 204 {
        ResponseBuilder::new().description("done, no body").build()
    } else {
        response("`{\"status\":\"ok\",\"data\":…}`", "Envelope")
    };
    builder = builder.response(route.success.to_string(), success);
    let mut errors = vec![
        ("400", "malformed input, the field named"),
        ("503", "NATS or Postgres unavailable"),
    ];
    if route.access != Access::Public {
        builder = builder
            .security(SecurityRequirement::new("bearer", Vec::<String>::new()))
            .security(SecurityRequirement::new("apiKey", Vec::<String>::new()));
        errors.push(("401", "no, bad, expired or revoked credentials"));
        if !matches!(route.access, Access::Device) {
            errors.push(("403", "valid key, wrong scope"));
        }
    }
    if route.path.contains('{') {
        errors.push(("404", "absent, or in another project"));
    }
    for (status, description) in errors {
        builder = builder.response(status, response(description, "Error"));
    }
    builder.build()
}

/// The platform's document: every route of every service given.
pub fn document(services: &[ServiceDoc]) -> OpenApi {
    let mut paths = PathsBuilder::new();
    for service in services {
        for route in service.routes {
            paths = paths.path(
                route.path,
                PathItem::new(route.method.http(), operation(service.service, route)),
            );
        }
    }
    let envelope = ObjectBuilder::new()
        .property(
            "status",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["ok"])),
        )
        .property("data", Schema::Object(Default::default()))
        .property(
            "page",
            ObjectBuilder::new()
                .property("limit", ObjectBuilder::new().schema_type(Type::Integer))
                .property(
                    "next_cursor",
                    ObjectBuilder::new().schema_type(Type::String),
                ),
        )
        .required("status")
        .required("data");
    let error = ObjectBuilder::new()
        .property(
            "status",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["error"])),
        )
        .property(
            "error",
            ObjectBuilder::new()
                .property("code", ObjectBuilder::new().schema_type(Type::Integer))
                .property("reason", ObjectBuilder::new().schema_type(Type::String))
                .property("message", ObjectBuilder::new().schema_type(Type::String))
                .required("code")
                .required("reason")
                .required("message"),
        )
        .required("status")
        .required("error");
    let components = ComponentsBuilder::new()
        .schema("Envelope", RefOr::T(Schema::Object(envelope.build())))
        .schema("Error", RefOr::T(Schema::Object(error.build())))
        .security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        )
        .security_scheme(
            "apiKey",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        )
        .build();
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("Fieldline")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "IoT data platform: devices, ingest, history, webhooks. Every response is \
                     the JSON envelope; errors carry a stable `reason`.",
                ))
                .build(),
        )
        .paths(paths.build())
        .components(Some(components))
        .tags(Some(services.iter().map(|service| {
            TagBuilder::new().name(service.service).build()
        })))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &[RouteDoc] = &[
        RouteDoc::new(
            Method::Get,
            "/api/v1/things/{id}",
            "Get a thing",
            Access::Read,
        )
        .query(&[("metric", "metric names")]),
        RouteDoc::new(
            Method::Delete,
            "/api/v1/things/{id}",
            "Delete a thing",
            Access::Write,
        ),
        RouteDoc::new(Method::Post, "/api/v1/things", "Create", Access::Write)
            .body(JSON)
            .success(201),
    ];

    #[test]
    fn routes_become_operations_with_their_parameters_and_errors() {
        let document = document(&[ServiceDoc {
            service: "things",
            routes: ROUTES,
        }]);
        let json = serde_json::to_value(&document).unwrap();
        assert_eq!(json["openapi"], "3.1.0");
        let thing = &json["paths"]["/api/v1/things/{id}"];
        assert_eq!(thing["get"]["operationId"], "get_api_v1_things_id");
        assert_eq!(thing["get"]["parameters"][0]["in"], "path");
        assert_eq!(thing["get"]["parameters"][1]["name"], "metric");
        assert!(thing["get"]["responses"]["404"].is_object());
        assert!(thing["delete"]["responses"]["204"].is_object());
        let create = &json["paths"]["/api/v1/things"]["post"];
        assert!(create["requestBody"]["content"]["application/json"].is_object());
        assert!(create["responses"]["201"].is_object());
        assert!(create["responses"]["404"].is_null());
    }
}
