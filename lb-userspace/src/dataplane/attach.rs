//! Attaching the loaded programs to an interface (XDP or TC ingress, TC
//! egress), what `auto` attaches, moving pinned links to a new program, and
//! the redirect map of the namespace's interfaces.

use std::{collections::HashSet, path::PathBuf};

use aya::programs::{
    SchedClassifier, TcAttachType, Xdp, XdpMode,
    links::{FdLink, LinkError, PinnedLink},
    tc::SchedClassifierLink,
    xdp::XdpLink,
};
use lb_common::programs;
use tracing::info;

use super::{Dataplane, DataplaneError, Result};
use crate::pins;

/// Where the balancer runs on ingress.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Deserialize,
    serde::Serialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// TC on a veth when every service is `local`, else XDP, native if the
    /// driver supports it (see [`AttachMode::resolve`]).
    #[default]
    Auto,
    /// XDP in the driver.
    Native,
    /// Generic XDP.
    Skb,
    /// TC ingress (clsact) on the socket buffer: keeps GRO/GSO, `local`
    /// services only.
    Tc,
}

impl AttachMode {
    fn xdp(self) -> XdpMode {
        match self {
            Self::Auto | Self::Tc => XdpMode::Default,
            Self::Native => XdpMode::Driver,
            Self::Skb => XdpMode::Skb,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Native => "native",
            Self::Skb => "skb",
            Self::Tc => "tc",
        }
    }

    /// What `auto` attaches to `iface`, and why: TC on a veth when every
    /// service is `local` (native XDP on a veth gives up GRO/GSO and copies
    /// every packet; TC works on the socket buffer as it is), XDP otherwise
    /// (`Auto` stays: native if the driver supports it). Other modes stay.
    pub fn resolve(self, iface: &str, all_local: bool) -> (AttachMode, String) {
        if self != Self::Auto {
            return (
                self,
                format!("xdp_mode = \"{}\" in the config", self.name()),
            );
        }
        let kind = crate::rtnl::link_kind(iface);
        match (kind.as_deref(), all_local) {
            (Some("veth"), true) => (
                Self::Tc,
                "a veth with only local services: TC ingress keeps GRO/GSO, which XDP on a veth loses".into(),
            ),
            (Some("veth"), false) => (
                Self::Auto,
                "a veth, but nat/dsr services need XDP (XDP_TX, redirects)".into(),
            ),
            (Some(k), _) => (Self::Auto, format!("a {k} interface: XDP")),
            (None, _) => (Self::Auto, "a physical interface (or of unknown kind): XDP".into()),
        }
    }
}

impl Dataplane {
    /// Attaches the balancer on ingress of `iface` (XDP in `mode`, or the
    /// TC ingress program for [`AttachMode::Tc`]; pass a resolved mode, see
    /// [`AttachMode::resolve`]) and the reply rewriter on TC egress. Both
    /// detach when the `Dataplane` is dropped, unless pinned.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<()> {
        let prog_err = |name: &'static str| move |source| DataplaneError::Program { name, source };
        let link_err = |name: &'static str| {
            move |e: LinkError| DataplaneError::Pin {
                path: PathBuf::from(name),
                message: format!("link: {e}"),
            }
        };
        let pin = self.opts.pin_path.clone();
        let same_iface = self.linked_interface.as_deref() == Some(iface);
        // A pinned link on this interface is moved to the new program in
        // one step (bpf_link_update): packets never see no program.
        let adopt = |path: &std::path::Path| -> Option<FdLink> {
            if !same_iface {
                let _ = std::fs::remove_file(path);
                return None;
            }
            PinnedLink::from_pin(path).ok().map(FdLink::from)
        };

        let xdp_pin = pin.as_ref().map(|p| pins::link_path(p, "xdp"));
        let ingress_pin = pin.as_ref().map(|p| pins::link_path(p, "tc_ingress"));
        // One ingress program at a time: the other mode's pinned link (a
        // restart that changed modes) is unpinned, which detaches it.
        let stale = if mode == AttachMode::Tc {
            xdp_pin.as_deref()
        } else {
            ingress_pin.as_deref()
        };
        if let Some(stale) = stale
            && stale.exists()
        {
            let _ = std::fs::remove_file(stale);
            info!(iface, link = %stale.display(), "the other ingress mode's link removed");
        }
        if mode == AttachMode::Tc {
            let tc: &mut SchedClassifier = self.program_mut(programs::TC_INGRESS)?;
            let existing = ingress_pin.as_deref().and_then(adopt);
            let id = match existing {
                Some(link) => {
                    let link = SchedClassifierLink::try_from(link)
                        .map_err(link_err(programs::TC_INGRESS))?;
                    tc.attach_to_link(link)
                        .map_err(prog_err(programs::TC_INGRESS))?
                }
                None => tc
                    .attach(iface, TcAttachType::Ingress)
                    .map_err(prog_err(programs::TC_INGRESS))?,
            };
            if let Some(path) = ingress_pin {
                let link =
                    FdLink::try_from(tc.take_link(id).map_err(prog_err(programs::TC_INGRESS))?)
                        .map_err(link_err(programs::TC_INGRESS))?;
                self.links.push(self.keep_pinned(path, link)?);
            }
        } else {
            let xdp: &mut Xdp = self.program_mut(programs::XDP)?;
            let existing = xdp_pin.as_deref().and_then(adopt);
            let id = match existing {
                Some(link) => {
                    let link = XdpLink::try_from(link).map_err(link_err(programs::XDP))?;
                    xdp.attach_to_link(link).map_err(prog_err(programs::XDP))?
                }
                None => xdp
                    .attach(iface, mode.xdp())
                    .map_err(prog_err(programs::XDP))?,
            };
            if let Some(path) = xdp_pin {
                let link = FdLink::try_from(xdp.take_link(id).map_err(prog_err(programs::XDP))?)
                    .map_err(link_err(programs::XDP))?;
                self.links.push(self.keep_pinned(path, link)?);
            }
        }

        let tc_pin = pin.as_ref().map(|p| pins::link_path(p, "tc_egress"));
        let tc: &mut SchedClassifier = self.program_mut(programs::TC_EGRESS)?;
        let existing = tc_pin.as_deref().and_then(adopt);
        let id = match existing {
            Some(link) => {
                let link =
                    SchedClassifierLink::try_from(link).map_err(link_err(programs::TC_EGRESS))?;
                tc.attach_to_link(link)
                    .map_err(prog_err(programs::TC_EGRESS))?
            }
            None => tc
                .attach(iface, TcAttachType::Egress)
                .map_err(prog_err(programs::TC_EGRESS))?,
        };
        if let Some(path) = tc_pin {
            let link = FdLink::try_from(tc.take_link(id).map_err(prog_err(programs::TC_EGRESS))?)
                .map_err(link_err(programs::TC_EGRESS))?;
            self.links.push(self.keep_pinned(path, link)?);
        }

        if let Some(pin) = &pin {
            self.record.layout = Self::layout_for(&self.opts, Some(iface.to_string()));
            self.write_record()?;
            // Maps retired by a layout change are no longer used by any
            // attached program.
            if let Ok(entries) = std::fs::read_dir(pin) {
                for e in entries.flatten() {
                    if e.file_name().to_string_lossy().starts_with("maps.retired") {
                        let _ = pins::remove_dir_files(&e.path());
                    }
                }
            }
        }
        self.sync_tx_ports()?;
        self.attach_mode = Some(mode);
        info!(
            iface,
            mode = mode.name(),
            adopted = self.adopted,
            "data plane attached"
        );
        Ok(())
    }

    /// Attaches again to an interface that went away and came back (a new
    /// ifindex): the old links died with the old interface, so they are
    /// dropped and unpinned, and the programs attached afresh.
    pub fn reattach(&mut self, iface: &str, mode: AttachMode) -> Result<()> {
        for (path, _) in &self.links {
            let _ = std::fs::remove_file(path);
        }
        self.links.clear();
        self.linked_interface = None;
        self.attach(iface, mode)
    }

    /// Pins `link` at `path` (unless it is pinned there already) and keeps
    /// a descriptor of it.
    fn keep_pinned(&self, path: PathBuf, link: FdLink) -> Result<(PathBuf, FdLink)> {
        if path.exists() {
            return Ok((path, link));
        }
        if let Some(dir) = path.parent() {
            let _ = crate::files::create_private_dir_all(dir);
        }
        let pinned = link.pin(&path).map_err(|e| DataplaneError::Pin {
            path: path.clone(),
            message: format!("pinning the link: {e}"),
        })?;
        Ok((path, FdLink::from(pinned)))
    }

    /// Lets `nat`/`dsr` packets be redirected to every interface of this
    /// network namespace (the FIB decides which one each packet takes), and
    /// to no interface that is gone. Called at attach and on every link
    /// event (see `links`).
    pub fn sync_tx_ports(&mut self) -> Result<usize> {
        let mut wanted = HashSet::new();
        for (ifindex, _) in interfaces()? {
            if ifindex == 1 || wanted.len() >= lb_common::MAX_TX_PORTS as usize {
                continue;
            }
            wanted.insert(ifindex);
        }
        let present: HashSet<u32> = self
            .tx_ports
            .keys()
            .filter_map(std::result::Result::ok)
            .collect();
        for ifindex in &wanted {
            if present.contains(ifindex) {
                continue;
            }
            self.tx_ports
                .insert(*ifindex, *ifindex, None, 0)
                .map_err(|e| {
                    DataplaneError::Options(format!("redirect map, ifindex {ifindex}: {e}"))
                })?;
        }
        for gone in present.difference(&wanted) {
            // The kernel drops entries of unregistered devices itself.
            let _ = self.tx_ports.remove(*gone);
        }
        Ok(wanted.len())
    }

    /// The interfaces `LB_TX_PORTS` holds (ifindexes).
    pub fn tx_ports(&self) -> Vec<u32> {
        self.tx_ports
            .keys()
            .filter_map(std::result::Result::ok)
            .collect()
    }
}

/// The interfaces of the calling thread's network namespace: (ifindex,
/// name). `if_nameindex` asks netlink, which answers for the thread's
/// namespace (sysfs would show the mounter's).
pub fn interfaces() -> Result<Vec<(u32, String)>> {
    let list = nix::net::if_::if_nameindex().map_err(|e| {
        DataplaneError::Options(format!("listing interfaces: {}", std::io::Error::from(e)))
    })?;
    Ok(list
        .iter()
        .map(|i| (i.index(), i.name().to_string_lossy().into_owned()))
        .collect())
}
