//! `s2dctl pool scrub`: start the scrub of every volume on the node that
//! runs it (`manager::runner`), and gather the last scrub of each from
//! every node.

use super::{ControlService, meta_status};
use crate::manager::runner;
use meta::state::NodeState;
use s2d_proto::v1::{ScrubResponse, VolumeScrub};
use tonic::{Response, Status};

fn failed(volume: &str, node: &str, error: String) -> VolumeScrub {
    VolumeScrub {
        volume: volume.to_string(),
        state: "failed".into(),
        node: node.to_string(),
        error,
        ..Default::default()
    }
}

impl ControlService {
    pub(super) async fn scrub_now(&self) -> Result<Response<ScrubResponse>, Status> {
        let view = self.meta.read().await.map_err(meta_status)?;
        let this = self.this_name(&view);
        let mut volumes = Vec::new();
        for v in view.state.volumes.values() {
            // A mirrored volume nobody serves and with nothing allocated
            // is scrubbed here (there is nothing to read).
            let node = runner(&view, v, None).unwrap_or(view.this);
            let name = view
                .state
                .nodes
                .get(&node)
                .map_or_else(|| format!("node-{node}"), |n| n.name.clone());
            let r = if node == view.this {
                self.manager.start_scrub(&v.name);
                self.manager
                    .scrub_report(&v.name, &this)
                    .unwrap_or_else(|| failed(&v.name, &this, "the scrub did not start".into()))
            } else {
                crate::peer::run_scrub(&super::node_address(&view, node), &v.name)
                    .await
                    .unwrap_or_else(|e| failed(&v.name, &name, e))
            };
            volumes.push(VolumeScrub { node: name, ..r });
        }
        Ok(Response::new(ScrubResponse { volumes }))
    }

    pub(super) async fn scrub_status_now(&self) -> Result<Response<ScrubResponse>, Status> {
        let view = self.meta.read().await.map_err(meta_status)?;
        let live: Vec<u64> = view
            .state
            .nodes
            .values()
            .filter(|n| n.state != NodeState::Retired as i32)
            .map(|n| n.id)
            .collect();
        let st = self.statuses(&view, live.into_iter()).await;
        let volumes = view
            .state
            .volumes
            .values()
            .map(|v| {
                st.iter()
                    .filter_map(|(id, s)| Some((*id, s.as_ref().ok()?)))
                    .filter_map(|(id, s)| {
                        let a = s.volumes.iter().find(|a| a.name == v.name)?;
                        Some((id, a.scrub.clone()?))
                    })
                    .max_by_key(|(_, s)| s.started_ms)
                    .map(|(id, s)| VolumeScrub {
                        node: view
                            .state
                            .nodes
                            .get(&id)
                            .map_or_else(|| format!("node-{id}"), |n| n.name.clone()),
                        ..s
                    })
                    .unwrap_or_else(|| VolumeScrub {
                        volume: v.name.clone(),
                        state: "never".into(),
                        ..Default::default()
                    })
            })
            .collect();
        Ok(Response::new(ScrubResponse { volumes }))
    }
}
