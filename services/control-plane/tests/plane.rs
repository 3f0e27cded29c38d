//! The test plane itself: starts every service on loopback and stops cleanly.

use ccm_control_plane::testing::TestPlane;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test]
async fn the_test_plane_serves_every_control_plane_service() {
    let plane = TestPlane::start().await.expect("starts");
    let channel = plane.channel().await.expect("connects");
    let mut health = HealthClient::new(channel);
    for service in [
        "ccm.v1.DefinitionService",
        "ccm.v1.TemplateService",
        "ccm.v1.InstanceService",
        "ccm.v1.WorkerService",
        "ccm.v1.EventService",
        "ccm.v1.InternalService",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .expect("health answers")
            .into_inner()
            .status;
        assert_eq!(status, 1, "{service} is SERVING");
    }
    plane.stop().await.expect("stops cleanly");
}
