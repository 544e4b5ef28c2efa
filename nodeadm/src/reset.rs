//! The commands that reset a node so it can be registered again.

use std::path::Path;

/// The reset procedure, one command per line, for refusals and docs.
pub fn reset_commands(state_dir: &Path) -> String {
    format!(
        "to register this node again, reset it first:\n\
         \x20 kubectl drain <node-name> --ignore-daemonsets   # from a machine with cluster access, if the node had joined\n\
         \x20 sudo nodeadm uninstall                          # deregisters the SSM managed instance, removes kubelet and its state\n\
         \x20 kubectl delete node <node-name>\n\
         \x20 sudo find {} -mindepth 1 -delete   # edgeflow's bootstrap state and NodeConfig (keep the directory)\n\
         then hand the node a new activation (one per registration) and restart the bootstrap\n\
         (packaged node: sudo systemctl restart edgeflow-bootstrap; otherwise restart edgeflow-agent)",
        state_dir.display()
    )
}
