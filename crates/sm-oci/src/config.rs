//! The parts of an image config that matter for running it, and the argv /
//! environment a `run IMAGE [CMD...]` resolves to (docker's rules).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::digest::Digest;
use crate::error::{Error, Result};

/// PATH docker sets when the image does not.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Run configuration of an image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// GOARCH of the image (`amd64`).
    pub architecture: String,
    /// GOOS of the image (`linux`).
    pub os: String,
    /// `Entrypoint` (empty when unset).
    pub entrypoint: Vec<String>,
    /// `Cmd` (empty when unset).
    pub cmd: Vec<String>,
    /// `Env`, `KEY=value` strings in image order.
    pub env: Vec<String>,
    /// `WorkingDir` (empty when unset: `/`).
    pub working_dir: String,
    /// `User` (`name`, `uid`, `uid:gid`, `name:group`; empty: root).
    pub user: String,
    /// `ExposedPorts` keys, sorted (`80/tcp`).
    pub exposed_ports: Vec<String>,
    /// `Labels`.
    pub labels: BTreeMap<String, String>,
    /// `StopSignal`, if set.
    pub stop_signal: Option<String>,
    /// `rootfs.diff_ids`: digests of the uncompressed layers, bottom first.
    pub diff_ids: Vec<Digest>,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<RawRun>,
    #[serde(default)]
    rootfs: Option<RawRootfs>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawRun {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    stop_signal: Option<String>,
}

#[derive(Deserialize)]
struct RawRootfs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

impl ImageConfig {
    /// Parse an OCI or docker image config blob.
    pub fn from_json(bytes: &[u8]) -> Result<ImageConfig> {
        let raw: RawConfig = serde_json::from_slice(bytes).map_err(|e| Error::invalid("image config", e))?;
        let run = raw.config.unwrap_or_default();
        let diff_ids = raw
            .rootfs
            .map(|r| r.diff_ids)
            .unwrap_or_default()
            .iter()
            .map(|d| Digest::parse(d))
            .collect::<Result<Vec<_>>>()?;
        Ok(ImageConfig {
            architecture: raw.architecture,
            os: raw.os,
            entrypoint: run.entrypoint.unwrap_or_default(),
            cmd: run.cmd.unwrap_or_default(),
            env: run.env.unwrap_or_default(),
            working_dir: run.working_dir.unwrap_or_default(),
            user: run.user.unwrap_or_default(),
            exposed_ports: run.exposed_ports.unwrap_or_default().into_keys().collect(),
            labels: run.labels.unwrap_or_default(),
            stop_signal: run.stop_signal,
            diff_ids,
        })
    }

    /// Resolve what to run, docker-style. See [`RunOverrides`].
    pub fn resolve(&self, o: &RunOverrides) -> Result<RunSpec> {
        let argv = resolve_argv(&self.entrypoint, &self.cmd, o.entrypoint.as_deref(), &o.cmd)?;
        let env = merge_env(&self.env, &o.env);
        let working_dir = match (&o.working_dir, self.working_dir.as_str()) {
            (Some(w), _) if !w.is_empty() => w.clone(),
            (_, "") => "/".to_string(),
            (_, w) => w.to_string(),
        };
        let user = o.user.clone().unwrap_or_else(|| self.user.clone());
        Ok(RunSpec { argv, env, working_dir, user })
    }
}

/// What the user gave on the command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunOverrides {
    /// `--entrypoint`: `None` keeps the image's; `Some(vec![])` (from
    /// `--entrypoint ""`) clears it. Either `Some` also drops the image's Cmd.
    pub entrypoint: Option<Vec<String>>,
    /// `run IMAGE [CMD...]`: replaces the image's Cmd when non-empty.
    pub cmd: Vec<String>,
    /// `-e KEY=value` (or `KEY` alone, which unsets / passes nothing here).
    pub env: Vec<String>,
    /// `-w DIR`.
    pub working_dir: Option<String>,
    /// `-u USER`.
    pub user: Option<String>,
}

/// The resolved process to start in the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunSpec {
    /// argv, `argv[0]` first.
    pub argv: Vec<String>,
    /// Environment, `KEY=value`, with PATH always present.
    pub env: Vec<String>,
    /// Working directory (absolute).
    pub working_dir: String,
    /// User spec (empty: root), resolved in the guest against its /etc/passwd.
    pub user: String,
}

/// `--entrypoint VALUE` as docker's CLI takes it: one string, not split;
/// an empty string clears the entrypoint.
pub fn entrypoint_from_cli(value: &str) -> Vec<String> {
    if value.is_empty() {
        Vec::new()
    } else {
        vec![value.to_string()]
    }
}

/// docker's argv rule:
/// - no override: `image.Entrypoint + (user_cmd if non-empty else image.Cmd)`;
/// - `--entrypoint E`: `E + user_cmd` (the image's Cmd is dropped);
/// - empty result: [`Error::NoCommand`].
pub fn resolve_argv(
    image_entrypoint: &[String],
    image_cmd: &[String],
    entrypoint_override: Option<&[String]>,
    user_cmd: &[String],
) -> Result<Vec<String>> {
    let (entry, cmd): (&[String], &[String]) = match entrypoint_override {
        Some(e) => (e, user_cmd),
        None if !user_cmd.is_empty() => (image_entrypoint, user_cmd),
        None => (image_entrypoint, image_cmd),
    };
    let argv: Vec<String> = entry.iter().chain(cmd).cloned().collect();
    if argv.is_empty() {
        return Err(Error::NoCommand);
    }
    Ok(argv)
}

/// Image env, then user env replacing same-named keys; PATH defaulted.
pub fn merge_env(image: &[String], user: &[String]) -> Vec<String> {
    let key = |s: &str| s.split('=').next().unwrap_or("").to_string();
    let mut out: Vec<String> = Vec::new();
    for e in image.iter().chain(user) {
        if !e.contains('=') {
            continue;
        }
        let k = key(e);
        match out.iter_mut().find(|x| key(x) == k) {
            Some(slot) => *slot = e.clone(),
            None => out.push(e.clone()),
        }
    }
    if !out.iter().any(|e| key(e) == "PATH") {
        out.insert(0, format!("PATH={DEFAULT_PATH}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn docker_argv_rules() {
        let ep = v(&["/docker-entrypoint.sh"]);
        let cmd = v(&["nginx", "-g", "daemon off;"]);
        // image defaults
        assert_eq!(
            resolve_argv(&ep, &cmd, None, &[]).unwrap(),
            v(&["/docker-entrypoint.sh", "nginx", "-g", "daemon off;"])
        );
        // user cmd replaces Cmd, keeps Entrypoint
        assert_eq!(resolve_argv(&ep, &cmd, None, &v(&["sh"])).unwrap(), v(&["/docker-entrypoint.sh", "sh"]));
        // --entrypoint drops image Cmd
        assert_eq!(resolve_argv(&ep, &cmd, Some(&v(&["/bin/sh"])), &[]).unwrap(), v(&["/bin/sh"]));
        assert_eq!(
            resolve_argv(&ep, &cmd, Some(&v(&["/bin/sh"])), &v(&["-c", "id"])).unwrap(),
            v(&["/bin/sh", "-c", "id"])
        );
        // --entrypoint "" clears
        assert_eq!(resolve_argv(&ep, &cmd, Some(&entrypoint_from_cli("")), &v(&["ls"])).unwrap(), v(&["ls"]));
        assert!(matches!(resolve_argv(&ep, &cmd, Some(&[]), &[]), Err(Error::NoCommand)));
        // no entrypoint: Cmd alone
        assert_eq!(resolve_argv(&[], &v(&["sh"]), None, &[]).unwrap(), v(&["sh"]));
        assert!(matches!(resolve_argv(&[], &[], None, &[]), Err(Error::NoCommand)));
    }

    #[test]
    fn parse_docker_config() {
        let j = br#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin","A=1"],"Cmd":["sh"],"Entrypoint":null,"WorkingDir":"/app","User":"1000:1000","ExposedPorts":{"8080/tcp":{},"53/udp":{}},"Labels":{"a":"b"}},"rootfs":{"type":"layers","diff_ids":["sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]},"history":[{"created_by":"x"}],"container_config":{"Hostname":""}}"#;
        let c = ImageConfig::from_json(j).unwrap();
        assert_eq!(c.cmd, v(&["sh"]));
        assert!(c.entrypoint.is_empty());
        assert_eq!(c.exposed_ports, v(&["53/udp", "8080/tcp"]));
        assert_eq!(c.diff_ids.len(), 1);
        let spec = c.resolve(&RunOverrides { env: v(&["A=2", "B=3", "C"]), ..Default::default() }).unwrap();
        assert_eq!(spec.argv, v(&["sh"]));
        assert_eq!(spec.env, v(&["PATH=/bin", "A=2", "B=3"]));
        assert_eq!(spec.working_dir, "/app");
        assert_eq!(spec.user, "1000:1000");
        let c = ImageConfig::from_json(br#"{"config":{"Cmd":["x"]}}"#).unwrap();
        let spec = c.resolve(&RunOverrides::default()).unwrap();
        assert_eq!(spec.env, vec![format!("PATH={DEFAULT_PATH}")]);
        assert_eq!(spec.working_dir, "/");
        assert!(ImageConfig::from_json(b"{\"config\": 5}").is_err());
    }
}
