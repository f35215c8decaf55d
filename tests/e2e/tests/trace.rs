//! One trace follows a product change from its Kinesis record to the catalog's write, and a
//! member change from EnqueueMemberChanges to the partner's HTTP request: the four services
//! run as processes exporting spans over OTLP to a receiver, and the span trees are checked
//! whole (one trace id, each span's parent, no orphans).

use std::time::Duration;

use mall_e2e::Platform;
use mall_proto::{
    member::v1::{
        Consent, EnqueueMemberChangesRequest, MarketingProfile, MemberChange,
        member_export_service_client::MemberExportServiceClient,
    },
    sync::v1::TraceContext,
};
use mall_test_support::otlp::{ReceivedSpan, SpanReceiver};
use mall_test_support::shoe_change;

/// The producers' traces and the span id that stands for each producer's own span.
const PRODUCT_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const MEMBER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PRODUCER_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_a_product_change_and_a_member_change_across_the_services() {
    let receiver = SpanReceiver::start().await;
    let mut platform = Platform::start(Some(&receiver.endpoint())).await;

    // A product change from its producer, through Kinesis, with the trace in its envelope.
    let mut change = shoe_change("E2E-TRACE-1", 1);
    change.trace_context = Some(TraceContext {
        traceparent: format!("00-{PRODUCT_TRACE}-{PRODUCER_SPAN}-01"),
        tracestate: String::new(),
    });
    platform.put_change(&change).await;
    platform.wait_for_product("E2E-TRACE-1", 1).await;

    // A member change, with the trace in the call's gRPC metadata.
    let channel = mall_test_support::probe::channel(platform.members.listening.grpc_addr);
    let mut members = MemberExportServiceClient::new(channel);
    let mut request = tonic::Request::new(EnqueueMemberChangesRequest {
        request_id: "e2e-trace-1".into(),
        changes: vec![member_change("E2E-M-1")],
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{MEMBER_TRACE}-{PRODUCER_SPAN}-01")
            .parse()
            .expect("ascii"),
    );
    members
        .enqueue_member_changes(request)
        .await
        .expect("the change is enqueued");
    let partner = platform.partner.clone();
    let traceparent = mall_test_support::wait_until(
        "the partner receives the member",
        Duration::from_secs(60),
        || {
            let partner = partner.clone();
            async move { partner.traceparents().into_iter().next() }
        },
    )
    .await
    .expect("the partner's request carries a traceparent");

    // Every span is flushed when the services exit.
    platform.stop().await;
    let spans = receiver.spans();

    // The product change: enqueue (parented by the record's trace) → apply (through the queue
    // message's attribute) → the relay's call → the catalog's BulkUpdateProducts → its write.
    // Walked up from the call that succeeded: a retry (the catalog not ready for the first
    // call, a redelivered message) may add spans, each of which must still be in the tree.
    let product = tree(&spans, PRODUCT_TRACE);
    let path = "mall.catalog.v1.ProductCatalogService/BulkUpdateProducts";
    let served = product.find("the catalog's successful BulkUpdateProducts", |s| {
        s.service == "product-catalog"
            && s.span.name == path
            && s.attribute("rpc.grpc.status_code").as_deref() == Some("0")
    });
    let call = product.parent_of(served);
    assert_eq!(
        (call.service.as_str(), call.span.name.as_str()),
        ("sync-relay", path)
    );
    assert_eq!(call.attribute("rpc.system").as_deref(), Some("grpc"));
    assert_eq!(
        call.attribute("rpc.service").as_deref(),
        Some("mall.catalog.v1.ProductCatalogService")
    );
    assert_eq!(
        call.attribute("rpc.method").as_deref(),
        Some("BulkUpdateProducts")
    );
    let apply = product.parent_of(call);
    assert_eq!(
        (apply.service.as_str(), apply.span.name.as_str()),
        ("sync-relay", "relay.apply")
    );
    assert_eq!(
        apply.attribute("messaging.operation.type").as_deref(),
        Some("process")
    );
    let enqueue = product.parent_of(apply);
    assert_eq!(
        (enqueue.service.as_str(), enqueue.span.name.as_str()),
        ("sync-relay", "relay.enqueue")
    );
    assert_eq!(enqueue.parent_id(), PRODUCER_SPAN, "{}", product.describe());
    assert_eq!(
        enqueue.attribute("messaging.operation.type").as_deref(),
        Some("send")
    );
    product.find("the catalog's database write inside that call", |s| {
        s.service == "product-catalog"
            && s.span.name == "bulk_write"
            && product.descends_from(s, served)
    });
    product.assert_no_orphans();

    // The member change: EnqueueMemberChanges → the delivery round (through the queue
    // message's attribute) → the partner's HTTP request, whose traceparent names that span.
    let member = tree(&spans, MEMBER_TRACE);
    let post = member.find("the partner's accepted HTTP request", |s| {
        s.service == "member-export"
            && s.span.name == "POST"
            && s.attribute("http.response.status_code").as_deref() == Some("200")
    });
    assert_eq!(
        post.attribute("http.request.method").as_deref(),
        Some("POST")
    );
    assert_eq!(
        traceparent,
        format!("00-{MEMBER_TRACE}-{}-01", post.span_id()),
        "the partner's request names the HTTP client span as its parent"
    );
    let deliver = member.parent_of(post);
    assert_eq!(
        (deliver.service.as_str(), deliver.span.name.as_str()),
        ("member-export", "member.deliver")
    );
    assert_eq!(
        deliver.attribute("messaging.operation.type").as_deref(),
        Some("process")
    );
    let enqueued = member.find("the EnqueueMemberChanges call", |s| {
        s.span.name == "mall.member.v1.MemberExportService/EnqueueMemberChanges"
    });
    assert_eq!(enqueued.service, "member-export");
    assert_eq!(enqueued.parent_id(), PRODUCER_SPAN, "{}", member.describe());
    assert!(
        member.descends_from(deliver, enqueued),
        "the delivery continues the enqueue's trace: {}",
        member.describe()
    );
    member.assert_no_orphans();
}

fn member_change(id: &str) -> MemberChange {
    MemberChange {
        member_id: id.into(),
        version: 1,
        consent: Some(Consent {
            marketing_email: true,
            ..Consent::default()
        }),
        profile: Some(MarketingProfile {
            email: "e2e@example.com".into(),
            display_name: "E2E Member".into(),
            preferred_language: "ko".into(),
            ..MarketingProfile::default()
        }),
        change_time: Some(prost_types::Timestamp {
            seconds: 1_800_000_000,
            nanos: 0,
        }),
        trace_context: None,
    }
}

/// The spans of one trace.
struct Tree<'a> {
    trace: &'a str,
    spans: Vec<&'a ReceivedSpan>,
}

fn tree<'a>(spans: &'a [ReceivedSpan], trace: &'a str) -> Tree<'a> {
    Tree {
        trace,
        spans: spans.iter().filter(|s| s.trace_id() == trace).collect(),
    }
}

impl<'a> Tree<'a> {
    /// The one span that matches `what`.
    fn find(&self, what: &str, matches: impl Fn(&ReceivedSpan) -> bool) -> &'a ReceivedSpan {
        let found: Vec<&&ReceivedSpan> = self.spans.iter().filter(|s| matches(s)).collect();
        assert_eq!(found.len(), 1, "one span: {what}; {}", self.describe());
        found[0]
    }

    /// `span`'s parent, which must be in the trace.
    fn parent_of(&self, span: &ReceivedSpan) -> &'a ReceivedSpan {
        let parent = span.parent_id();
        self.spans
            .iter()
            .find(|s| s.span_id() == parent)
            .unwrap_or_else(|| {
                panic!(
                    "{} {} has no parent in the trace: {}",
                    span.service,
                    span.span.name,
                    self.describe()
                )
            })
    }

    /// Whether `span`'s chain of parents reaches `ancestor`.
    fn descends_from(&self, span: &ReceivedSpan, ancestor: &ReceivedSpan) -> bool {
        let mut parent = span.parent_id();
        for _ in 0..self.spans.len() {
            if parent == ancestor.span_id() {
                return true;
            }
            match self.spans.iter().find(|s| s.span_id() == parent) {
                Some(next) => parent = next.parent_id(),
                None => return false,
            }
        }
        false
    }

    /// Every span's parent is a span of the trace, or the producer's own span.
    fn assert_no_orphans(&self) {
        for span in &self.spans {
            let parent = span.parent_id();
            assert!(
                parent == PRODUCER_SPAN || self.spans.iter().any(|s| s.span_id() == parent),
                "{} {} has a parent ({parent}) outside the trace: {}",
                span.service,
                span.span.name,
                self.describe()
            );
        }
    }

    fn describe(&self) -> String {
        let lines: Vec<String> = self
            .spans
            .iter()
            .map(|s| {
                format!(
                    "{} {} span {} parent {}",
                    s.service,
                    s.span.name,
                    s.span_id(),
                    s.parent_id()
                )
            })
            .collect();
        format!("trace {}:\n  {}", self.trace, lines.join("\n  "))
    }
}
