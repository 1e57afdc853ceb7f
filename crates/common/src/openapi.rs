//! The OpenAPI 3.1 document (`GET /api/v1/openapi.json`, rendered at `/docs`), built from the
//! route tables each service keeps beside its `configure` function. A route's entry names
//! the Rust types of its request and its answer (`ToSchema`), its query parameters, and the
//! statuses only it can answer (409, 422); the statuses every route of its kind can answer
//! (400, 401, 403, 404, 413, 415, 429, 503) follow from its access, path and body. A test in
//! the `fieldline` crate checks both ways that the tables and the registered routes are the
//! same set, and the e2e tests hold the live services to the document with schemathesis, so
//! the document cannot drift from the code.

use std::collections::BTreeMap;

use utoipa::{
    PartialSchema, ToSchema,
    openapi::{
        ArrayBuilder, ComponentsBuilder, ContentBuilder, HttpMethod, InfoBuilder, ObjectBuilder,
        OpenApi, OpenApiBuilder, PathItem, PathsBuilder, Ref, RefOr, Required, ResponseBuilder,
        Schema, Type,
        header::HeaderBuilder,
        path::{OperationBuilder, ParameterBuilder, ParameterIn},
        request_body::RequestBodyBuilder,
        schema::SchemaFormat,
        security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme},
        tag::TagBuilder,
    },
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

    /// The security scheme of the document that names this credential.
    fn scheme(self) -> Option<&'static str> {
        match self {
            Access::Public => None,
            Access::Device => Some("deviceToken"),
            Access::Read | Access::Write | Access::Admin => Some("apiKey"),
            Access::PlatformAdmin => Some("platformAdmin"),
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

/// The named schemas a document collects while its operations refer to them.
pub type Schemas = Vec<(String, RefOr<Schema>)>;

/// A schema as a route table holds it: a function (so the table stays `const`) that adds the
/// named schemas it refers to and answers the schema itself.
pub type SchemaOf = fn(&mut Schemas) -> RefOr<Schema>;

/// The schema of `T`, by reference (`#/components/schemas/T`).
pub fn schema<T: ToSchema>(schemas: &mut Schemas) -> RefOr<Schema> {
    T::schemas(schemas);
    let name = T::name();
    schemas.push((name.to_string(), T::schema()));
    Ref::from_schema_name(name).into()
}

/// An array of `T`.
pub fn array<T: ToSchema>(schemas: &mut Schemas) -> RefOr<Schema> {
    ArrayBuilder::new().items(schema::<T>(schemas)).into()
}

/// Any JSON value (a configuration, a command's params).
pub fn any(_: &mut Schemas) -> RefOr<Schema> {
    Schema::default().into()
}

/// A JSON object, free in its members (a merge patch, metadata).
pub fn object(_: &mut Schemas) -> RefOr<Schema> {
    ObjectBuilder::new().schema_type(Type::Object).into()
}

/// A text body (CSV, NDJSON, Prometheus text).
pub fn text(_: &mut Schemas) -> RefOr<Schema> {
    String::schema()
}

/// Characters no display name may hold: controls, and the line and bidi-override marks.
const NOT_IN_NAME: &str = r"\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069";

macro_rules! text_schema {
    ($(#[$doc:meta])* $type:ident, $name:literal, $build:expr) => {
        $(#[$doc])*
        pub struct $type;

        impl PartialSchema for $type {
            fn schema() -> RefOr<Schema> {
                let build: fn() -> ObjectBuilder = $build;
                build().into()
            }
        }

        impl ToSchema for $type {
            fn name() -> std::borrow::Cow<'static, str> {
                $name.into()
            }
        }
    };
}

text_schema!(
    /// An id or a slug (`DeviceId`, `ProjectSlug`): 1 to 64 of `A-Z a-z 0-9 _ -`.
    IdText,
    "Id",
    || Kind::Id.schema().examples(["greenhouse-7"])
);
text_schema!(
    /// A group, a tag or a metric: 1 to 64 of `A-Z a-z 0-9 _ - .`.
    LabelText,
    "Label",
    || Kind::Label.schema().examples(["greenhouses"])
);
text_schema!(
    /// A display name: 1 to 200 characters, not only whitespace, no control characters.
    NameText,
    "Name",
    || {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(200))
            .pattern(Some(format!(
                "^[^{NOT_IN_NAME}]*[^\\s{NOT_IN_NAME}][^{NOT_IN_NAME}]*$"
            )))
            .examples(["Greenhouse 7"])
    }
);

/// A reading's value: a number, a boolean or a text.
pub struct ReadingValue;

impl PartialSchema for ReadingValue {
    fn schema() -> RefOr<Schema> {
        utoipa::openapi::OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::Number))
            .item(ObjectBuilder::new().schema_type(Type::Boolean))
            .item(ObjectBuilder::new().schema_type(Type::String))
            .examples([serde_json::json!(21.5)])
            .into()
    }
}

impl ToSchema for ReadingValue {
    fn name() -> std::borrow::Cow<'static, str> {
        "ReadingValue".into()
    }
}

/// One media type of a body and its schema.
#[derive(Debug, Clone, Copy)]
pub struct Content {
    pub media: &'static str,
    pub schema: SchemaOf,
}

impl Content {
    pub const fn json(schema: SchemaOf) -> Self {
        Self {
            media: "application/json",
            schema,
        }
    }
}

/// CSV text, a header line then one row a line.
pub const CSV: Content = Content {
    media: "text/csv",
    schema: text,
};

/// Newline-delimited JSON, one object a line.
pub const NDJSON: Content = Content {
    media: "application/x-ndjson",
    schema: text,
};

/// What a success answers.
#[derive(Debug, Clone, Copy)]
pub enum Answer {
    /// No body (204).
    Empty,
    /// `{"status":"ok","data":…}` with `data` of this schema.
    Data(SchemaOf),
    /// `{"status":"ok","data":[…],"page":{…}}`: an array of this schema, keyset paged.
    Page(SchemaOf),
    /// A body outside the envelope.
    Raw(&'static [Content]),
}

/// The schema of a query or path parameter.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Text,
    /// An id or a slug: 1 to 64 of `A-Z a-z 0-9 _ -`.
    Id,
    /// A group or a tag: 1 to 64 of `A-Z a-z 0-9 _ - .`.
    Label,
    Integer {
        min: i64,
        max: i64,
    },
    Boolean,
    /// RFC 3339.
    Time,
    OneOf(&'static [&'static str]),
}

impl Kind {
    fn schema(self) -> ObjectBuilder {
        let text = ObjectBuilder::new().schema_type(Type::String);
        match self {
            Kind::Text => text.min_length(Some(1)),
            Kind::Id => text
                .pattern(Some("^[A-Za-z0-9_-]{1,64}$"))
                .min_length(Some(1))
                .max_length(Some(64)),
            Kind::Label => text
                .pattern(Some("^[A-Za-z0-9_.-]{1,64}$"))
                .min_length(Some(1))
                .max_length(Some(64)),
            Kind::Integer { min, max } => ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(min as f64))
                .maximum(Some(max as f64)),
            Kind::Boolean => ObjectBuilder::new().schema_type(Type::Boolean),
            Kind::Time => text.format(Some(SchemaFormat::KnownFormat(
                utoipa::openapi::KnownFormat::DateTime,
            ))),
            Kind::OneOf(values) => text.enum_values(Some(values.iter().copied())),
        }
    }
}

/// A query parameter: name, description, schema.
#[derive(Debug, Clone, Copy)]
pub struct Param {
    pub name: &'static str,
    pub description: &'static str,
    pub kind: Kind,
}

impl Param {
    pub const fn new(name: &'static str, description: &'static str, kind: Kind) -> Self {
        Self {
            name,
            description,
            kind,
        }
    }
}

/// One route of the public API.
#[derive(Debug, Clone, Copy)]
pub struct RouteDoc {
    pub method: Method,
    /// As registered with actix: `/api/v1/devices/{id}`.
    pub path: &'static str,
    pub summary: &'static str,
    pub access: Access,
    /// Query parameters.
    pub query: &'static [Param],
    /// Path parameters whose schema is not [`Kind::Id`].
    pub path_kinds: &'static [(&'static str, Kind)],
    /// The schema of a JSON request body.
    pub body: Option<SchemaOf>,
    /// Request bodies of other media types.
    pub other_bodies: &'static [Content],
    /// Whether the body may be left out.
    pub body_optional: bool,
    /// Status of a success.
    pub success: u16,
    pub answer: Answer,
    /// Other media types of the success, chosen by a parameter (`format=csv`).
    pub alternatives: &'static [Content],
    /// Statuses this route answers beyond those of every route of its kind (409, 422...).
    pub errors: &'static [u16],
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
            path_kinds: &[],
            body: None,
            other_bodies: &[],
            body_optional: false,
            success: match method {
                Method::Delete => 204,
                _ => 200,
            },
            answer: match method {
                Method::Delete => Answer::Empty,
                _ => Answer::Data(any),
            },
            alternatives: &[],
            errors: &[],
        }
    }

    pub const fn query(self, query: &'static [Param]) -> Self {
        Self { query, ..self }
    }

    pub const fn path_kinds(self, path_kinds: &'static [(&'static str, Kind)]) -> Self {
        Self { path_kinds, ..self }
    }

    /// A JSON body of this schema.
    pub const fn body(self, schema: SchemaOf) -> Self {
        Self {
            body: Some(schema),
            ..self
        }
    }

    /// Bodies in other media types (CSV, SenML...), beside or instead of JSON.
    pub const fn other_bodies(self, other_bodies: &'static [Content]) -> Self {
        Self {
            other_bodies,
            ..self
        }
    }

    /// The body may be left out.
    pub const fn optional_body(self) -> Self {
        Self {
            body_optional: true,
            ..self
        }
    }

    /// Success `status` with `data` of this schema.
    pub const fn data(self, status: u16, schema: SchemaOf) -> Self {
        Self {
            success: status,
            answer: Answer::Data(schema),
            ..self
        }
    }

    /// A keyset-paged list of this schema.
    pub const fn page(self, schema: SchemaOf) -> Self {
        Self {
            success: 200,
            answer: Answer::Page(schema),
            ..self
        }
    }

    /// A success of no body.
    pub const fn empty(self, status: u16) -> Self {
        Self {
            success: status,
            answer: Answer::Empty,
            ..self
        }
    }

    /// A success outside the envelope.
    pub const fn raw(self, status: u16, content: &'static [Content]) -> Self {
        Self {
            success: status,
            answer: Answer::Raw(content),
            ..self
        }
    }

    pub const fn alternatives(self, alternatives: &'static [Content]) -> Self {
        Self {
            alternatives,
            ..self
        }
    }

    pub const fn errors(self, errors: &'static [u16]) -> Self {
        Self { errors, ..self }
    }
}

/// One service's routes, under its name (the document's tag).
pub struct ServiceDoc {
    pub service: &'static str,
    pub routes: &'static [RouteDoc],
}

/// The methods of each path of the document, for the `Allow` header of a 405. The binary
/// registers it as app data; a process without it answers 405 without `Allow`.
#[derive(Debug, Clone, Default)]
pub struct AllowedMethods(std::collections::HashMap<&'static str, String>);

impl AllowedMethods {
    pub fn new(services: &[ServiceDoc]) -> Self {
        let mut methods: BTreeMap<&'static str, Vec<&'static str>> = BTreeMap::new();
        for route in services.iter().flat_map(|service| service.routes) {
            methods
                .entry(route.path)
                .or_default()
                .push(route.method.as_str());
        }
        Self(
            methods
                .into_iter()
                .map(|(path, mut methods)| {
                    methods.sort_unstable();
                    (path, methods.join(", "))
                })
                .collect(),
        )
    }

    /// `GET, POST` for a path pattern as registered (`/api/v1/devices/{id}`).
    pub fn of(&self, pattern: &str) -> Option<&str> {
        self.0.get(pattern).map(String::as_str)
    }
}

/// The query parameters of a keyset-paged listing.
pub const PAGING: [Param; 2] = [
    Param::new(
        "limit",
        "page size, 1 to 1000 (default 100)",
        Kind::Integer { min: 1, max: 1000 },
    ),
    Param::new(
        "cursor",
        "`page.next_cursor` of the previous page",
        Kind::Text,
    ),
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

/// What a status means on any route; the `reason` in the body says which case it is.
fn error_description(status: u16) -> &'static str {
    match status {
        400 => "malformed input: the message names the parameter or field",
        401 => "no, bad, expired or revoked credentials",
        403 => "valid credentials without the scope, or not the platform admin",
        404 => "absent, or in another project",
        409 => "conflicts with what exists (an id taken, a state that does not allow it)",
        413 => "body larger than the limit (received, or once inflated)",
        415 => "Content-Type or Content-Encoding not accepted here",
        422 => "well formed but not acceptable (the message says why)",
        429 => "rate limited: try again after Retry-After seconds",
        503 => "NATS, Postgres or a service behind it unavailable: try again",
        _ => "error",
    }
}

/// Every status this route can answer besides its success: what its access, path and body
/// make possible, and its own.
fn error_statuses(route: &RouteDoc) -> Vec<u16> {
    // A NUL in the path or query is refused before routing, on every route.
    let mut statuses = vec![400];
    if route.access != Access::Public {
        statuses.extend([401, 429, 503]);
        if route.access != Access::Device {
            statuses.push(403);
        }
    }
    if route.path.contains('{') {
        statuses.push(404);
    }
    if route.body.is_some() || !route.other_bodies.is_empty() {
        statuses.extend([413, 415]);
    }
    statuses.extend(route.errors);
    statuses.sort_unstable();
    statuses.dedup();
    statuses
}

fn error_response(status: u16) -> utoipa::openapi::Response {
    let mut builder = ResponseBuilder::new()
        .description(error_description(status))
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Error")))
                .build(),
        );
    if matches!(status, 429 | 503) {
        builder = builder.header(
            "Retry-After",
            HeaderBuilder::new()
                .schema(ObjectBuilder::new().schema_type(Type::Integer))
                .description(Some("seconds to wait before trying again"))
                .build(),
        );
    }
    builder.build()
}

fn envelope(data: RefOr<Schema>, paged: bool) -> Schema {
    let mut object = ObjectBuilder::new()
        .property(
            "status",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["ok"])),
        )
        .property("data", data)
        .required("status")
        .required("data");
    if paged {
        object = object
            .property("page", Ref::from_schema_name("Page"))
            .required("page");
    }
    Schema::Object(object.build())
}

fn content(schema: RefOr<Schema>) -> utoipa::openapi::content::Content {
    ContentBuilder::new().schema(Some(schema)).build()
}

fn path_parameters(route: &RouteDoc) -> impl Iterator<Item = (&'static str, Kind)> + '_ {
    route
        .path
        .split('/')
        .filter_map(|part| part.strip_prefix('{').and_then(|p| p.strip_suffix('}')))
        .map(|name| {
            let kind = route
                .path_kinds
                .iter()
                .find(|(named, _)| *named == name)
                .map_or(Kind::Id, |(_, kind)| *kind);
            (name, kind)
        })
}

fn operation(
    service: &str,
    route: &RouteDoc,
    schemas: &mut Schemas,
) -> utoipa::openapi::path::Operation {
    let mut builder = OperationBuilder::new()
        .operation_id(Some(operation_id(route)))
        .summary(Some(route.summary))
        .description(Some(route.access.describe()))
        .tag(service);
    for (name, kind) in path_parameters(route) {
        builder = builder.parameter(
            ParameterBuilder::new()
                .name(name)
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .schema(Some(kind.schema())),
        );
    }
    for param in route.query {
        builder = builder.parameter(
            ParameterBuilder::new()
                .name(param.name)
                .parameter_in(ParameterIn::Query)
                .required(Required::False)
                .description(Some(param.description))
                .schema(Some(param.kind.schema())),
        );
    }
    if route.body.is_some() || !route.other_bodies.is_empty() {
        let required = if route.body_optional {
            Required::False
        } else {
            Required::True
        };
        let mut body = RequestBodyBuilder::new().required(Some(required));
        if let Some(schema) = route.body {
            body = body.content("application/json", content(schema(schemas)));
        }
        for other in route.other_bodies {
            body = body.content(other.media, content((other.schema)(schemas)));
        }
        builder = builder.request_body(Some(body.build()));
    }
    let mut success = ResponseBuilder::new().description(match route.success {
        201 => "created",
        202 => "accepted: it happens after the answer",
        204 => "done, no body",
        _ => "ok",
    });
    match route.answer {
        Answer::Empty => {}
        Answer::Data(data) => {
            success = success.content(
                "application/json",
                content(envelope(data(schemas), false).into()),
            );
        }
        Answer::Page(item) => {
            let items = ArrayBuilder::new().items(item(schemas)).into();
            success = success.content("application/json", content(envelope(items, true).into()));
        }
        Answer::Raw(bodies) => {
            for body in bodies {
                success = success.content(body.media, content((body.schema)(schemas)));
            }
        }
    }
    for other in route.alternatives {
        success = success.content(other.media, content((other.schema)(schemas)));
    }
    builder = builder.response(route.success.to_string(), success.build());
    if let Some(scheme) = route.access.scheme() {
        builder = builder.security(SecurityRequirement::new(scheme, Vec::<String>::new()));
    }
    for status in error_statuses(route) {
        builder = builder.response(status.to_string(), error_response(status));
    }
    builder.build()
}

fn error_schema() -> Schema {
    Schema::Object(
        ObjectBuilder::new()
            .description(Some(
                "Every error: the HTTP status again, a stable snake_case `reason` to branch on, \
                 and a message for people that names the parameter or field at fault.",
            ))
            .property(
                "status",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(["error"])),
            )
            .property(
                "error",
                ObjectBuilder::new()
                    .property(
                        "code",
                        ObjectBuilder::new()
                            .schema_type(Type::Integer)
                            .minimum(Some(400.0))
                            .maximum(Some(599.0)),
                    )
                    .property(
                        "reason",
                        ObjectBuilder::new().schema_type(Type::String).examples([
                            "invalid_field",
                            "device_not_found",
                            "rate_limited",
                        ]),
                    )
                    .property("message", ObjectBuilder::new().schema_type(Type::String))
                    .required("code")
                    .required("reason")
                    .required("message"),
            )
            .required("status")
            .required("error")
            .examples([serde_json::json!({
                "status": "error",
                "error": {
                    "code": 404,
                    "reason": "device_not_found",
                    "message": "device greenhouse-7 not found"
                }
            })])
            .build(),
    )
}

fn bearer(description: &str) -> SecurityScheme {
    SecurityScheme::Http(
        HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some(description))
            .build(),
    )
}

/// Names given to two different schemas: `ToSchema` names a type by its bare name, so
/// `keys::RotateIn` and `webhooks::RotateIn` would share one entry of the document unless one
/// is renamed (`#[schema(as = KeyRotateIn)]`).
pub fn schema_name_clashes(services: &[ServiceDoc]) -> Vec<String> {
    let mut schemas = Schemas::new();
    for route in services.iter().flat_map(|service| service.routes) {
        let mut collect = |of: SchemaOf| {
            of(&mut schemas);
        };
        route.body.into_iter().for_each(&mut collect);
        route
            .other_bodies
            .iter()
            .for_each(|body| collect(body.schema));
        match route.answer {
            Answer::Data(of) | Answer::Page(of) => collect(of),
            Answer::Raw(bodies) => bodies.iter().for_each(|body| collect(body.schema)),
            Answer::Empty => {}
        }
        route
            .alternatives
            .iter()
            .for_each(|body| collect(body.schema));
    }
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut clashes = Vec::new();
    for (name, schema) in schemas {
        let text = serde_json::to_string(&schema).unwrap_or_default();
        match seen.get(&name) {
            Some(earlier) if *earlier != text => clashes.push(name),
            Some(_) => {}
            None => {
                seen.insert(name, text);
            }
        }
    }
    clashes.sort_unstable();
    clashes.dedup();
    clashes
}

/// The platform's document: every route of every service given.
pub fn document(services: &[ServiceDoc]) -> OpenApi {
    let mut paths = PathsBuilder::new();
    let mut schemas = Schemas::new();
    for service in services {
        for route in service.routes {
            paths = paths.path(
                route.path,
                PathItem::new(
                    route.method.http(),
                    operation(service.service, route, &mut schemas),
                ),
            );
        }
    }
    schema::<crate::envelope::Page>(&mut schemas);
    // One entry a name; a type that several routes name was pushed once each (two types of
    // one name would be one schema: `schema_name_clashes` finds them).
    let schemas: BTreeMap<String, RefOr<Schema>> = schemas.into_iter().collect();
    let components = ComponentsBuilder::new()
        .schemas_from_iter(schemas)
        .schema("Error", RefOr::T(error_schema()))
        .security_scheme(
            "apiKey",
            bearer(
                "A project API key (`flk_…`) as `Authorization: Bearer flk_…` (or in an \
                 `X-API-Key` header). Its scopes: read, write, admin.",
            ),
        )
        .security_scheme(
            "deviceToken",
            bearer(
                "A device token (`fld_…`), shown once when the device is created or its token \
                 rotated, as `Authorization: Bearer fld_…`.",
            ),
        )
        .security_scheme(
            "platformAdmin",
            bearer(
                "The platform admin key (`FIELDLINE_BOOTSTRAP_ADMIN_KEY`), which creates \
                 projects and reads the dead letters.",
            ),
        )
        .build();
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("Fieldline")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "IoT data platform: devices, ingest, history, webhooks. Every JSON answer \
                     is the envelope `{\"status\":\"ok\",\"data\":…}` (lists add `page`); every \
                     error is `{\"status\":\"error\",\"error\":{\"code\",\"reason\",\"message\"}}` \
                     with a stable `reason`.",
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

    #[derive(utoipa::ToSchema)]
    #[allow(dead_code)]
    struct ThingIn {
        name: String,
    }

    #[derive(utoipa::ToSchema)]
    #[allow(dead_code)]
    struct ThingOut {
        id: String,
        name: String,
    }

    const ROUTES: &[RouteDoc] = &[
        RouteDoc::new(
            Method::Get,
            "/api/v1/things/{id}",
            "Get a thing",
            Access::Read,
        )
        .query(&[Param::new("metric", "metric names", Kind::Text)])
        .data(200, schema::<ThingOut>),
        RouteDoc::new(
            Method::Delete,
            "/api/v1/things/{id}",
            "Delete a thing",
            Access::Write,
        ),
        RouteDoc::new(Method::Post, "/api/v1/things", "Create", Access::Write)
            .body(schema::<ThingIn>)
            .data(201, schema::<ThingOut>)
            .errors(&[409]),
        RouteDoc::new(Method::Get, "/api/v1/things", "List", Access::Read)
            .query(&PAGING)
            .page(schema::<ThingOut>)
            .alternatives(&[CSV]),
    ];

    #[test]
    fn routes_become_operations_with_their_types_parameters_and_errors() {
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
        let ok = &thing["get"]["responses"]["200"]["content"]["application/json"]["schema"];
        assert_eq!(
            ok["properties"]["data"]["$ref"],
            "#/components/schemas/ThingOut"
        );
        assert!(thing["get"]["responses"]["404"].is_object());
        assert!(thing["get"]["responses"]["409"].is_null());
        assert_eq!(thing["get"]["security"][0]["apiKey"], serde_json::json!([]));
        assert!(thing["delete"]["responses"]["204"]["content"].is_null());
        let create = &json["paths"]["/api/v1/things"]["post"];
        assert_eq!(
            create["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/ThingIn"
        );
        for status in ["201", "409", "413", "415", "429"] {
            assert!(create["responses"][status].is_object(), "{status}");
        }
        assert!(create["responses"]["404"].is_null());
        let list = &json["paths"]["/api/v1/things"]["get"]["responses"]["200"]["content"];
        assert_eq!(
            list["application/json"]["schema"]["properties"]["data"]["items"]["$ref"],
            "#/components/schemas/ThingOut"
        );
        assert!(list["text/csv"].is_object());
        assert!(json["components"]["schemas"]["ThingIn"]["properties"]["name"].is_object());
        assert!(json["components"]["schemas"]["Page"].is_object());
    }

    #[test]
    fn allowed_methods_are_each_path_s_from_every_service() {
        const OTHER: &[RouteDoc] = &[RouteDoc::new(
            Method::Post,
            "/api/v1/things/{id}",
            "Touch",
            Access::Write,
        )];
        let allowed = AllowedMethods::new(&[
            ServiceDoc {
                service: "things",
                routes: ROUTES,
            },
            ServiceDoc {
                service: "other",
                routes: OTHER,
            },
        ]);
        assert_eq!(allowed.of("/api/v1/things/{id}"), Some("DELETE, GET, POST"));
        assert_eq!(allowed.of("/api/v1/things"), Some("GET, POST"));
        assert_eq!(allowed.of("/api/v1/nothing"), None);
    }
}
