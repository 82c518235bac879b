//! A test server that speaks Qdrant's gRPC API over qdrant-edge.
//!
//! A real Qdrant server cannot be installed on the build machines, so the
//! Qdrant backend is tested through the real qdrant-client against this:
//! qdrant-client's own generated server traits (`collections_server`,
//! `points_server`) implemented on Qdrant's engine (qdrant-edge), one edge
//! shard per (collection, shard key). It implements the calls ragd makes
//! (collections, shard keys, field indexes, upsert, query with filters,
//! delete by filter, count, scroll, get by id) with Qdrant's semantics for custom
//! sharding; every other call answers `Unimplemented`. It is test support,
//! never a production store. Faults can be injected per call.

use parking_lot::Mutex;
use qdrant_client::qdrant as g;
use qdrant_client::qdrant::collections_server::{Collections, CollectionsServer};
use qdrant_client::qdrant::points_server::{Points, PointsServer};
use qdrant_edge::external::ordered_float::OrderedFloat;
use qdrant_edge::external::serde_json;
use qdrant_edge::{
    Condition, ConditionalInsertOperation, CountRequest, CreateIndex, Distance, EdgeConfig,
    EdgeShard, EdgeVectorParams, FieldCondition, FieldIndexOperations, Filter, JsonPath, Match,
    MatchExcept, NamedQuery, PayloadFieldSchema, PayloadOps, PayloadSchemaType, PointId,
    PointInsertOperations, PointOperations, PointStruct, QueryEnum, QueryRequest, Range,
    ScoringQuery, ScrollRequest, SetPayloadOp, UpdateOperation, VectorStructInternal,
    WithPayloadInterface, WithVector, DEFAULT_VECTOR_NAME,
};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use tonic::{Code, Request, Response, Status};

struct Collection {
    dim: u64,
    shard_number: u32,
    replication_factor: u32,
    indexes: Vec<(String, PayloadSchemaType)>,
    shards: BTreeMap<String, Arc<EdgeShard>>,
    dir: PathBuf,
}

#[derive(Default)]
struct State {
    collections: Mutex<HashMap<String, Collection>>,
    /// Serialises writes (edge shards are single-writer).
    writer: Mutex<()>,
    faults: Mutex<VecDeque<Code>>,
    /// Every call fails as Unavailable (see [`QdrantTestServer::go_down`]).
    down: std::sync::atomic::AtomicBool,
    /// The next call of a method fails with the code, once.
    rejects: Mutex<Vec<(&'static str, Code)>>,
    calls: Mutex<Vec<Call>>,
    dir: PathBuf,
}

/// What the server saw: the method and the shard keys it was asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub method: &'static str,
    pub shard_keys: Vec<String>,
}

#[derive(Clone)]
struct Service(Arc<State>);

/// The running server; stops and deletes its data on drop.
pub struct QdrantTestServer {
    /// `http://127.0.0.1:PORT`, for qdrant-client.
    pub url: String,
    state: Arc<State>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl QdrantTestServer {
    pub fn start() -> QdrantTestServer {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ragd-qdrant-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a temp folder for the test server");
        let state = Arc::new(State {
            dir,
            ..Default::default()
        });
        let svc = Service(state.clone());
        let (addr, stop) = super::serve_in_thread(move |listener, stop| async move {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(CollectionsServer::new(svc.clone()))
                .add_service(PointsServer::new(svc))
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.await;
                })
                .await;
        });
        QdrantTestServer {
            url: format!("http://{addr}"),
            state,
            _stop: stop,
        }
    }

    /// The next calls fail with these codes, one each, in order.
    pub fn fail_next(&self, codes: impl IntoIterator<Item = Code>) {
        self.state.faults.lock().extend(codes);
    }

    /// The next call of `method` (e.g. "query") fails with InvalidArgument,
    /// whatever other calls come meanwhile: a request the server refuses.
    pub fn reject_next(&self, method: &'static str) {
        self.state
            .rejects
            .lock()
            .push((method, Code::InvalidArgument));
    }

    /// Every call fails as Unavailable, as from a server that is down (or
    /// a proxy in front of one), until [`QdrantTestServer::clear_faults`].
    pub fn go_down(&self) {
        self.state
            .down
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Drops the faults not yet used; a server gone down is back.
    pub fn clear_faults(&self) {
        self.state.faults.lock().clear();
        self.state
            .down
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.state.calls.lock().clone()
    }

    /// The shard keys of a collection.
    pub fn shard_keys(&self, collection: &str) -> Vec<String> {
        self.state
            .collections
            .lock()
            .get(collection)
            .map(|c| c.shards.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// (shard_number, replication_factor) the collection was created with.
    pub fn sharding(&self, collection: &str) -> Option<(u32, u32)> {
        self.state
            .collections
            .lock()
            .get(collection)
            .map(|c| (c.shard_number, c.replication_factor))
    }

    /// Points stored under one shard key.
    pub fn points_in(&self, collection: &str, key: &str) -> usize {
        let shard = self
            .state
            .collections
            .lock()
            .get(collection)
            .and_then(|c| c.shards.get(key).cloned());
        shard
            .map(|s| {
                s.count(CountRequest {
                    filter: None,
                    exact: true,
                })
                .unwrap_or(0)
            })
            .unwrap_or(0)
    }
}

impl Drop for QdrantTestServer {
    fn drop(&mut self) {
        self.state.collections.lock().clear();
        let _ = std::fs::remove_dir_all(&self.state.dir);
    }
}

/// The payload a request asks for, as Qdrant reads it: all of it by
/// default, none, or the fields it includes.
fn payload_selector(s: Option<g::WithPayloadSelector>) -> Result<WithPayloadInterface, Status> {
    use g::with_payload_selector::SelectorOptions;
    Ok(match s.and_then(|s| s.selector_options) {
        None => WithPayloadInterface::Bool(true),
        Some(SelectorOptions::Enable(on)) => WithPayloadInterface::Bool(on),
        Some(SelectorOptions::Include(i)) => WithPayloadInterface::Fields(
            i.fields
                .iter()
                .map(|f| {
                    f.parse()
                        .map_err(|_| Status::invalid_argument(format!("field {f}")))
                })
                .collect::<Result<_, _>>()?,
        ),
        Some(SelectorOptions::Exclude(_)) => {
            return Err(Status::unimplemented("excluding payload fields"))
        }
    })
}

fn key_name(k: &g::ShardKey) -> Result<String, Status> {
    match &k.key {
        Some(g::shard_key::Key::Keyword(s)) => Ok(s.clone()),
        Some(g::shard_key::Key::Number(n)) => Ok(n.to_string()),
        None => Err(Status::invalid_argument("empty shard key")),
    }
}

fn selector_keys(s: &Option<g::ShardKeySelector>) -> Result<Vec<String>, Status> {
    s.as_ref()
        .map(|s| s.shard_keys.iter().map(key_name).collect())
        .unwrap_or_else(|| Ok(vec![]))
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

fn unsupported(what: &str) -> Status {
    Status::unimplemented(format!("the ragd test server does not implement {what}"))
}

fn filter(f: g::Filter) -> Result<Filter, Status> {
    fn list(v: Vec<g::Condition>) -> Result<Option<Vec<Condition>>, Status> {
        if v.is_empty() {
            return Ok(None);
        }
        v.into_iter()
            .map(condition)
            .collect::<Result<_, _>>()
            .map(Some)
    }
    if f.min_should.is_some() {
        return Err(unsupported("min_should"));
    }
    Ok(Filter {
        should: list(f.should)?,
        must: list(f.must)?,
        must_not: list(f.must_not)?,
        ..Default::default()
    })
}

fn condition(c: g::Condition) -> Result<Condition, Status> {
    use g::condition::ConditionOneOf as C;
    use g::r#match::MatchValue as M;
    match c.condition_one_of {
        Some(C::Field(fc)) => {
            let key: JsonPath = fc
                .key
                .parse()
                .map_err(|_| Status::invalid_argument(format!("bad key {:?}", fc.key)))?;
            if let Some(r) = fc.range {
                let bound = |b: Option<f64>| b.map(OrderedFloat);
                let range = Range {
                    lt: bound(r.lt),
                    gt: bound(r.gt),
                    gte: bound(r.gte),
                    lte: bound(r.lte),
                };
                return Ok(Condition::Field(FieldCondition::new_range(key, range)));
            }
            let m = match fc.r#match.and_then(|m| m.match_value) {
                Some(M::Keyword(s)) => Match::from(s),
                Some(M::Integer(i)) => Match::from(i),
                Some(M::Boolean(b)) => Match::from(b),
                Some(M::Keywords(r)) => Match::from(r.strings),
                Some(M::Integers(r)) => Match::from(r.integers),
                Some(M::ExceptKeywords(r)) => Match::Except(MatchExcept::from(r.strings)),
                Some(M::ExceptIntegers(r)) => Match::Except(MatchExcept::from(r.integers)),
                _ => return Err(unsupported("this field condition")),
            };
            Ok(Condition::Field(FieldCondition::new_match(key, m)))
        }
        Some(C::Filter(f)) => Ok(Condition::Filter(filter(f)?)),
        Some(C::HasId(h)) => Ok(Condition::HasId(
            h.has_id
                .into_iter()
                .map(edge_id)
                .collect::<Result<_, _>>()?,
        )),
        Some(C::IsEmpty(e)) => {
            let key: JsonPath = e
                .key
                .parse()
                .map_err(|_| Status::invalid_argument(format!("bad key {:?}", e.key)))?;
            Ok(Condition::IsEmpty(key.into()))
        }
        _ => Err(unsupported("this condition")),
    }
}

/// The points a request's selector names.
enum Selected {
    Filter(Filter),
    Ids(Vec<PointId>),
}

fn selected(s: Option<g::PointsSelector>, none: &str) -> Result<Selected, Status> {
    use g::points_selector::PointsSelectorOneOf as S;
    match s.and_then(|p| p.points_selector_one_of) {
        Some(S::Filter(f)) => Ok(Selected::Filter(filter(f)?)),
        Some(S::Points(ids)) => Ok(Selected::Ids(
            ids.ids.into_iter().map(edge_id).collect::<Result<_, _>>()?,
        )),
        None => Err(Status::invalid_argument(none.to_string())),
    }
}

fn grpc_id(id: PointId) -> g::PointId {
    match id {
        PointId::NumId(n) => n.into(),
        PointId::Uuid(u) => u.to_string().into(),
    }
}

fn edge_id(id: g::PointId) -> Result<PointId, Status> {
    match id.point_id_options {
        Some(g::point_id::PointIdOptions::Num(n)) => Ok(PointId::NumId(n)),
        Some(g::point_id::PointIdOptions::Uuid(u)) => u
            .parse()
            .map(PointId::Uuid)
            .map_err(|_| Status::invalid_argument("bad uuid")),
        None => Err(Status::invalid_argument("empty point id")),
    }
}

fn id_order(id: &PointId) -> (u8, u64, String) {
    match id {
        PointId::NumId(n) => (0, *n, String::new()),
        PointId::Uuid(u) => (1, 0, u.to_string()),
    }
}

fn grpc_payload(p: Option<qdrant_edge::Payload>) -> HashMap<String, g::Value> {
    p.map(|p| {
        p.0.into_iter()
            .map(|(k, v)| (k, g::Value::from(v)))
            .collect()
    })
    .unwrap_or_default()
}

/// Whether a call asks for the points' vectors (all of them or none).
fn wants_vectors(s: &Option<g::WithVectorsSelector>) -> Result<bool, Status> {
    use g::with_vectors_selector::SelectorOptions;
    match s.as_ref().and_then(|s| s.selector_options.as_ref()) {
        None => Ok(false),
        Some(SelectorOptions::Enable(on)) => Ok(*on),
        Some(SelectorOptions::Include(_)) => Err(unsupported("choosing named vectors")),
    }
}

/// A point's (single, unnamed, dense) vector as the API returns it.
fn grpc_vectors(v: Option<VectorStructInternal>) -> Option<g::VectorsOutput> {
    let data = crate::indexer::edge::dense_vector(v?)?;
    Some(g::VectorsOutput {
        vectors_options: Some(g::vectors_output::VectorsOptions::Vector(g::VectorOutput {
            vector: Some(g::vector_output::Vector::Dense(g::DenseVector { data })),
            ..Default::default()
        })),
    })
}

fn ok_update() -> g::PointsOperationResponse {
    g::PointsOperationResponse {
        result: Some(g::UpdateResult {
            operation_id: Some(0),
            status: g::UpdateStatus::Completed as i32,
        }),
        time: 0.0,
        usage: None,
    }
}

impl Service {
    /// Records the call; fails it if a fault is queued.
    fn enter(&self, method: &'static str, shard_keys: Vec<String>) -> Result<(), Status> {
        self.0.calls.lock().push(Call { method, shard_keys });
        if self.0.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Status::unavailable(format!("down: {method} refused")));
        }
        let mut rejects = self.0.rejects.lock();
        if let Some(i) = rejects.iter().position(|(m, _)| *m == method) {
            let (_, code) = rejects.remove(i);
            return Err(Status::new(code, format!("injected rejection of {method}")));
        }
        drop(rejects);
        match self.0.faults.lock().pop_front() {
            Some(code) => Err(Status::new(code, format!("injected fault in {method}"))),
            None => Ok(()),
        }
    }

    fn new_shard(&self, c: &Collection, key: &str) -> Result<EdgeShard, Status> {
        let dir = c.dir.join(hex_name(key));
        std::fs::create_dir_all(&dir).map_err(internal)?;
        let config = EdgeConfig::builder()
            .vector(
                DEFAULT_VECTOR_NAME,
                EdgeVectorParams::builder(c.dim as usize, Distance::Cosine).build(),
            )
            .build();
        let shard = EdgeShard::new(&dir, config).map_err(internal)?;
        for (field, ty) in &c.indexes {
            shard.update(index_op(field, *ty)?).map_err(internal)?;
        }
        Ok(shard)
    }

    /// The shards a request addresses: the selector's keys (each must
    /// exist), or all of them when there is no selector.
    fn shards(
        &self,
        collection: &str,
        keys: &[String],
    ) -> Result<Vec<(String, Arc<EdgeShard>)>, Status> {
        let cols = self.0.collections.lock();
        let c = cols.get(collection).ok_or_else(|| {
            Status::not_found(format!("Collection `{collection}` doesn't exist!"))
        })?;
        if keys.is_empty() {
            return Ok(c
                .shards
                .iter()
                .map(|(k, s)| (k.clone(), s.clone()))
                .collect());
        }
        keys.iter()
            .map(|k| {
                c.shards
                    .get(k)
                    .map(|s| (k.clone(), s.clone()))
                    .ok_or_else(|| Status::invalid_argument(format!("Shard key {k} not found")))
            })
            .collect()
    }

    fn dim(&self, collection: &str) -> Result<u64, Status> {
        self.0
            .collections
            .lock()
            .get(collection)
            .map(|c| c.dim)
            .ok_or_else(|| Status::not_found(format!("Collection `{collection}` doesn't exist!")))
    }
}

fn hex_name(key: &str) -> String {
    key.bytes().map(|b| format!("{b:02x}")).collect()
}

fn index_op(field: &str, ty: PayloadSchemaType) -> Result<UpdateOperation, Status> {
    Ok(UpdateOperation::FieldIndexOperation(
        FieldIndexOperations::CreateIndex(CreateIndex {
            field_name: field
                .parse()
                .map_err(|_| Status::invalid_argument("bad field name"))?,
            field_schema: Some(PayloadFieldSchema::FieldType(ty)),
        }),
    ))
}

/// The calls ragd never makes. Written in async_trait's expanded form: the
/// attribute runs before this macro expands, so it cannot rewrite these.
macro_rules! unimplemented_calls {
    ($($name:ident($req:ident) -> $resp:ident;)*) => {
        $(
            fn $name<'life0, 'async_trait>(
                &'life0 self,
                _: Request<g::$req>,
            ) -> std::pin::Pin<
                Box<
                    dyn std::future::Future<Output = Result<Response<g::$resp>, Status>>
                        + Send
                        + 'async_trait,
                >,
            >
            where
                'life0: 'async_trait,
                Self: 'async_trait,
            {
                Box::pin(async move { Err(unsupported(stringify!($name))) })
            }
        )*
    };
}

#[tonic::async_trait]
impl Collections for Service {
    async fn create(
        &self,
        request: Request<g::CreateCollection>,
    ) -> Result<Response<g::CollectionOperationResponse>, Status> {
        self.enter("create_collection", vec![])?;
        let r = request.into_inner();
        let dim = match r.vectors_config.and_then(|v| v.config) {
            Some(g::vectors_config::Config::Params(p)) => p.size,
            _ => return Err(unsupported("collections without one unnamed dense vector")),
        };
        if r.sharding_method != Some(g::ShardingMethod::Custom as i32) {
            return Err(unsupported("auto sharding (ragd uses custom sharding)"));
        }
        let mut cols = self.0.collections.lock();
        if cols.contains_key(&r.collection_name) {
            return Err(Status::already_exists(format!(
                "Collection `{}` already exists!",
                r.collection_name
            )));
        }
        let dir = self.0.dir.join(hex_name(&r.collection_name));
        cols.insert(
            r.collection_name,
            Collection {
                dim,
                shard_number: r.shard_number.unwrap_or(1),
                replication_factor: r.replication_factor.unwrap_or(1),
                indexes: vec![],
                shards: BTreeMap::new(),
                dir,
            },
        );
        Ok(Response::new(g::CollectionOperationResponse {
            result: true,
            time: 0.0,
        }))
    }

    async fn get(
        &self,
        request: Request<g::GetCollectionInfoRequest>,
    ) -> Result<Response<g::GetCollectionInfoResponse>, Status> {
        self.enter("get_collection", vec![])?;
        let name = request.into_inner().collection_name;
        let cols = self.0.collections.lock();
        let c = cols
            .get(&name)
            .ok_or_else(|| Status::not_found(format!("Collection `{name}` doesn't exist!")))?;
        let params = g::CollectionParams {
            shard_number: c.shard_number,
            replication_factor: Some(c.replication_factor),
            sharding_method: Some(g::ShardingMethod::Custom as i32),
            vectors_config: Some(g::VectorsConfig {
                config: Some(g::vectors_config::Config::Params(g::VectorParams {
                    size: c.dim,
                    distance: g::Distance::Cosine as i32,
                    ..Default::default()
                })),
            }),
            ..Default::default()
        };
        Ok(Response::new(g::GetCollectionInfoResponse {
            result: Some(g::CollectionInfo {
                status: g::CollectionStatus::Green as i32,
                config: Some(g::CollectionConfig {
                    params: Some(params),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            time: 0.0,
        }))
    }

    async fn collection_exists(
        &self,
        request: Request<g::CollectionExistsRequest>,
    ) -> Result<Response<g::CollectionExistsResponse>, Status> {
        self.enter("collection_exists", vec![])?;
        let name = request.into_inner().collection_name;
        let exists = self.0.collections.lock().contains_key(&name);
        Ok(Response::new(g::CollectionExistsResponse {
            result: Some(g::CollectionExists { exists }),
            time: 0.0,
        }))
    }

    async fn create_shard_key(
        &self,
        request: Request<g::CreateShardKeyRequest>,
    ) -> Result<Response<g::CreateShardKeyResponse>, Status> {
        let r = request.into_inner();
        let key = r
            .request
            .and_then(|c| c.shard_key)
            .ok_or_else(|| Status::invalid_argument("no shard key"))
            .and_then(|k| key_name(&k))?;
        self.enter("create_shard_key", vec![key.clone()])?;
        let _w = self.0.writer.lock();
        let mut cols = self.0.collections.lock();
        let c = cols.get_mut(&r.collection_name).ok_or_else(|| {
            Status::not_found(format!("Collection `{}` doesn't exist!", r.collection_name))
        })?;
        if c.shards.contains_key(&key) {
            return Err(Status::already_exists(format!(
                "Shard key {key} already exists"
            )));
        }
        let shard = self.new_shard(c, &key)?;
        c.shards.insert(key, Arc::new(shard));
        Ok(Response::new(g::CreateShardKeyResponse {
            result: true,
            time: 0.0,
        }))
    }

    async fn list_shard_keys(
        &self,
        request: Request<g::ListShardKeysRequest>,
    ) -> Result<Response<g::ListShardKeysResponse>, Status> {
        self.enter("list_shard_keys", vec![])?;
        let name = request.into_inner().collection_name;
        let cols = self.0.collections.lock();
        let c = cols
            .get(&name)
            .ok_or_else(|| Status::not_found(format!("Collection `{name}` doesn't exist!")))?;
        Ok(Response::new(g::ListShardKeysResponse {
            shard_keys: c
                .shards
                .keys()
                .map(|k| g::ShardKeyDescription {
                    key: Some(g::ShardKey::from(k.clone())),
                })
                .collect(),
            time: 0.0,
        }))
    }

    unimplemented_calls! {
        list(ListCollectionsRequest) -> ListCollectionsResponse;
        update(UpdateCollection) -> CollectionOperationResponse;
        delete(DeleteCollection) -> CollectionOperationResponse;
        update_aliases(ChangeAliases) -> CollectionOperationResponse;
        list_collection_aliases(ListCollectionAliasesRequest) -> ListAliasesResponse;
        list_aliases(ListAliasesRequest) -> ListAliasesResponse;
        collection_cluster_info(CollectionClusterInfoRequest) -> CollectionClusterInfoResponse;
        update_collection_cluster_setup(UpdateCollectionClusterSetupRequest) -> UpdateCollectionClusterSetupResponse;
        delete_shard_key(DeleteShardKeyRequest) -> DeleteShardKeyResponse;
    }
}

#[tonic::async_trait]
impl Points for Service {
    async fn create_field_index(
        &self,
        request: Request<g::CreateFieldIndexCollection>,
    ) -> Result<Response<g::PointsOperationResponse>, Status> {
        self.enter("create_field_index", vec![])?;
        let r = request.into_inner();
        let ty = match r.field_type.and_then(|t| g::FieldType::try_from(t).ok()) {
            Some(g::FieldType::Keyword) => PayloadSchemaType::Keyword,
            Some(g::FieldType::Integer) => PayloadSchemaType::Integer,
            _ => return Err(unsupported("this field index type")),
        };
        let _w = self.0.writer.lock();
        let mut cols = self.0.collections.lock();
        let c = cols.get_mut(&r.collection_name).ok_or_else(|| {
            Status::not_found(format!("Collection `{}` doesn't exist!", r.collection_name))
        })?;
        for shard in c.shards.values() {
            shard
                .update(index_op(&r.field_name, ty)?)
                .map_err(internal)?;
        }
        // (Qdrant answers a second creation with success, as here.)
        if !c.indexes.iter().any(|(f, _)| *f == r.field_name) {
            c.indexes.push((r.field_name, ty));
        }
        Ok(Response::new(ok_update()))
    }

    async fn upsert(
        &self,
        request: Request<g::UpsertPoints>,
    ) -> Result<Response<g::PointsOperationResponse>, Status> {
        let r = request.into_inner();
        let keys = selector_keys(&r.shard_key_selector)?;
        self.enter("upsert", keys.clone())?;
        if keys.is_empty() {
            return Err(Status::invalid_argument(
                "Shard key not specified (the collection uses custom sharding)",
            ));
        }
        let dim = self.dim(&r.collection_name)?;
        let mut points = Vec::with_capacity(r.points.len());
        for p in r.points {
            let id = edge_id(p.id.ok_or_else(|| Status::invalid_argument("no id"))?)?;
            let vector = match p.vectors.and_then(|v| v.vectors_options) {
                Some(g::vectors::VectorsOptions::Vector(v)) => v
                    .try_into_dense()
                    .map_err(|e| Status::invalid_argument(e.to_string()))?,
                _ => return Err(unsupported("named vectors")),
            };
            if vector.len() as u64 != dim {
                return Err(Status::invalid_argument(format!(
                    "Wrong input: Vector dimension error: expected dim: {dim}, got {}",
                    vector.len()
                )));
            }
            let payload = serde_json::Value::Object(
                p.payload
                    .into_iter()
                    .map(|(k, v)| (k, v.into_json()))
                    .collect(),
            );
            let id = match id {
                PointId::NumId(n) => n,
                PointId::Uuid(_) => return Err(unsupported("uuid point ids")),
            };
            points.push(PointStruct::new(id, vector, payload).into());
        }
        if r.update_mode.is_some() {
            return Err(unsupported("update_mode"));
        }
        // Qdrant's conditional upsert: a stored point that does not match
        // `update_filter` keeps its state; new points go in regardless.
        let condition = r.update_filter.map(filter).transpose()?;
        let shards = self.shards(&r.collection_name, &keys)?;
        let _w = self.0.writer.lock();
        for (_, shard) in shards {
            let points_op = PointInsertOperations::PointsList(points.clone());
            let op = match &condition {
                Some(condition) => {
                    PointOperations::UpsertPointsConditional(ConditionalInsertOperation {
                        points_op,
                        condition: condition.clone(),
                        update_mode: None,
                    })
                }
                None => PointOperations::UpsertPoints(points_op),
            };
            shard
                .update(UpdateOperation::PointOperation(op))
                .map_err(internal)?;
        }
        Ok(Response::new(ok_update()))
    }

    async fn delete(
        &self,
        request: Request<g::DeletePoints>,
    ) -> Result<Response<g::PointsOperationResponse>, Status> {
        let r = request.into_inner();
        let keys = selector_keys(&r.shard_key_selector)?;
        self.enter("delete", keys.clone())?;
        let op = match selected(r.points, "nothing to delete")? {
            Selected::Filter(f) => PointOperations::DeletePointsByFilter(f),
            Selected::Ids(ids) => PointOperations::DeletePoints { ids },
        };
        let shards = self.shards(&r.collection_name, &keys)?;
        let _w = self.0.writer.lock();
        for (_, shard) in shards {
            shard
                .update(UpdateOperation::PointOperation(op.clone()))
                .map_err(internal)?;
        }
        Ok(Response::new(ok_update()))
    }

    async fn query(
        &self,
        request: Request<g::QueryPoints>,
    ) -> Result<Response<g::QueryResponse>, Status> {
        let r = request.into_inner();
        let keys = selector_keys(&r.shard_key_selector)?;
        self.enter("query", keys.clone())?;
        let vector = match r.query.and_then(|q| q.variant) {
            Some(g::query::Variant::Nearest(g::VectorInput {
                variant: Some(g::vector_input::Variant::Dense(d)),
            })) => d.data,
            _ => return Err(unsupported("queries other than nearest to a dense vector")),
        };
        let dim = self.dim(&r.collection_name)?;
        if vector.len() as u64 != dim {
            return Err(Status::invalid_argument(format!(
                "Wrong input: Vector dimension error: expected dim: {dim}, got {}",
                vector.len()
            )));
        }
        let filter = r.filter.map(filter).transpose()?;
        let limit = r.limit.unwrap_or(10) as usize;
        let offset = r.offset.unwrap_or(0) as usize;
        let mut all = Vec::new();
        for (key, shard) in self.shards(&r.collection_name, &keys)? {
            let points = shard
                .query(QueryRequest {
                    prefetches: vec![],
                    query: Some(ScoringQuery::Vector(QueryEnum::Nearest(
                        NamedQuery::default_dense(vector.clone()),
                    ))),
                    filter: filter.clone(),
                    score_threshold: r
                        .score_threshold
                        .map(qdrant_edge::external::ordered_float::OrderedFloat),
                    limit: limit + offset,
                    offset: 0,
                    params: None,
                    with_vector: WithVector::Bool(false),
                    with_payload: WithPayloadInterface::Bool(true),
                })
                .map_err(internal)?;
            all.extend(points.into_iter().map(|p| g::ScoredPoint {
                id: Some(grpc_id(p.id)),
                payload: grpc_payload(p.payload),
                score: p.score,
                version: p.version,
                vectors: None,
                shard_key: Some(g::ShardKey::from(key.clone())),
                order_value: None,
            }));
        }
        all.sort_by(|a, b| b.score.total_cmp(&a.score));
        let result = all.into_iter().skip(offset).take(limit).collect();
        Ok(Response::new(g::QueryResponse {
            result,
            time: 0.0,
            usage: None,
        }))
    }

    async fn count(
        &self,
        request: Request<g::CountPoints>,
    ) -> Result<Response<g::CountResponse>, Status> {
        let r = request.into_inner();
        let keys = selector_keys(&r.shard_key_selector)?;
        self.enter("count", keys.clone())?;
        let filter = r.filter.map(filter).transpose()?;
        let mut count = 0u64;
        for (_, shard) in self.shards(&r.collection_name, &keys)? {
            count += shard
                .count(CountRequest {
                    filter: filter.clone(),
                    exact: true,
                })
                .map_err(internal)? as u64;
        }
        Ok(Response::new(g::CountResponse {
            result: Some(g::CountResult { count }),
            time: 0.0,
            usage: None,
        }))
    }

    async fn get(
        &self,
        request: Request<g::GetPoints>,
    ) -> Result<Response<g::GetResponse>, Status> {
        let r = request.into_inner();
        let keys = selector_keys(&r.shard_key_selector)?;
        self.enter("get", keys.clone())?;
        let ids: Vec<PointId> = r.ids.into_iter().map(edge_id).collect::<Result<_, _>>()?;
        let with_payload = payload_selector(r.with_payload)?;
        let mut result = Vec::new();
        for (key, shard) in self.shards(&r.collection_name, &keys)? {
            let records = shard
                .retrieve(
                    &ids,
                    Some(with_payload.clone()),
                    Some(WithVector::Bool(false)),
                )
                .map_err(internal)?;
            result.extend(records.into_iter().map(|rec| g::RetrievedPoint {
                id: Some(grpc_id(rec.id)),
                payload: grpc_payload(rec.payload),
                vectors: None,
                shard_key: Some(g::ShardKey::from(key.clone())),
                order_value: None,
            }));
        }
        Ok(Response::new(g::GetResponse {
            result,
            time: 0.0,
            usage: None,
        }))
    }

    async fn scroll(
        &self,
        request: Request<g::ScrollPoints>,
    ) -> Result<Response<g::ScrollResponse>, Status> {
        let r = request.into_inner();
        let keys = selector_keys(&r.shard_key_selector)?;
        self.enter("scroll", keys.clone())?;
        let filter = r.filter.map(filter).transpose()?;
        let limit = r.limit.unwrap_or(10) as usize;
        let offset = r.offset.map(edge_id).transpose()?;
        let with_payload = payload_selector(r.with_payload)?;
        let with_vector = WithVector::Bool(wants_vectors(&r.with_vectors)?);
        // Each shard's page from the offset, merged in id order; one more
        // than the limit tells the next page's offset.
        let mut all = Vec::new();
        for (key, shard) in self.shards(&r.collection_name, &keys)? {
            let (records, _) = shard
                .scroll(ScrollRequest {
                    offset,
                    limit: Some(limit + 1),
                    filter: filter.clone(),
                    with_payload: Some(with_payload.clone()),
                    with_vector: with_vector.clone(),
                    order_by: None,
                })
                .map_err(internal)?;
            all.extend(records.into_iter().map(|rec| (key.clone(), rec)));
        }
        all.sort_by_key(|(_, rec)| id_order(&rec.id));
        let next_page_offset = all.get(limit).map(|(_, rec)| grpc_id(rec.id));
        let result = all
            .into_iter()
            .take(limit)
            .map(|(key, rec)| g::RetrievedPoint {
                id: Some(grpc_id(rec.id)),
                payload: grpc_payload(rec.payload),
                vectors: grpc_vectors(rec.vector),
                shard_key: Some(g::ShardKey::from(key)),
                order_value: None,
            })
            .collect();
        Ok(Response::new(g::ScrollResponse {
            next_page_offset,
            result,
            time: 0.0,
            usage: None,
        }))
    }

    /// Only payload settings (the text-key backfill sends them), each
    /// applied to the shards its selector names (all, with none), in
    /// order.
    async fn update_batch(
        &self,
        request: Request<g::UpdateBatchPoints>,
    ) -> Result<Response<g::UpdateBatchResponse>, Status> {
        use g::points_update_operation::Operation as O;
        let r = request.into_inner();
        self.enter("update_batch", vec![])?;
        let mut ops = Vec::with_capacity(r.operations.len());
        for op in r.operations {
            let Some(O::SetPayload(set)) = op.operation else {
                return Err(unsupported("this batch operation"));
            };
            if set.key.is_some() {
                return Err(unsupported("a nested payload key"));
            }
            let (points, filter) =
                match selected(set.points_selector, "no points to set a payload on")? {
                    Selected::Filter(f) => (None, Some(f)),
                    Selected::Ids(ids) => (Some(ids), None),
                };
            let payload: serde_json::Map<_, _> = set
                .payload
                .into_iter()
                .map(|(k, v)| (k, v.into_json()))
                .collect();
            let keys = selector_keys(&set.shard_key_selector)?;
            let op = UpdateOperation::PayloadOperation(PayloadOps::SetPayload(SetPayloadOp {
                payload: payload.into(),
                points,
                filter,
                key: None,
            }));
            ops.push((keys, op));
        }
        let _w = self.0.writer.lock();
        let mut result = Vec::with_capacity(ops.len());
        for (keys, op) in ops {
            for (_, shard) in self.shards(&r.collection_name, &keys)? {
                shard.update(op.clone()).map_err(internal)?;
            }
            result.extend(ok_update().result);
        }
        Ok(Response::new(g::UpdateBatchResponse {
            result,
            time: 0.0,
            usage: None,
        }))
    }

    unimplemented_calls! {
        update_vectors(UpdatePointVectors) -> PointsOperationResponse;
        delete_vectors(DeletePointVectors) -> PointsOperationResponse;
        set_payload(SetPayloadPoints) -> PointsOperationResponse;
        overwrite_payload(SetPayloadPoints) -> PointsOperationResponse;
        delete_payload(DeletePayloadPoints) -> PointsOperationResponse;
        clear_payload(ClearPayloadPoints) -> PointsOperationResponse;
        delete_field_index(DeleteFieldIndexCollection) -> PointsOperationResponse;
        create_vector_name(CreateVectorNameRequest) -> PointsOperationResponse;
        delete_vector_name(DeleteVectorNameRequest) -> PointsOperationResponse;
        search(SearchPoints) -> SearchResponse;
        search_batch(SearchBatchPoints) -> SearchBatchResponse;
        search_groups(SearchPointGroups) -> SearchGroupsResponse;
        recommend(RecommendPoints) -> RecommendResponse;
        recommend_batch(RecommendBatchPoints) -> RecommendBatchResponse;
        recommend_groups(RecommendPointGroups) -> RecommendGroupsResponse;
        discover(DiscoverPoints) -> DiscoverResponse;
        discover_batch(DiscoverBatchPoints) -> DiscoverBatchResponse;
        query_batch(QueryBatchPoints) -> QueryBatchResponse;
        query_groups(QueryPointGroups) -> QueryGroupsResponse;
        facet(FacetCounts) -> FacetResponse;
        search_matrix_pairs(SearchMatrixPoints) -> SearchMatrixPairsResponse;
        search_matrix_offsets(SearchMatrixPoints) -> SearchMatrixOffsetsResponse;
    }
}
