//! Resolving an exec's `user` field (`uid[:gid]` or `name[:group]`) via
//! /etc/passwd and /etc/group of the guest, without NSS (the agent is a
//! static binary).

/// Who an exec runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// The home directory from /etc/passwd, if the user has an entry.
    pub(crate) home: Option<String>,
}

/// Resolves `spec` against the guest's /etc/passwd and /etc/group. The files
/// are only read when a name or a missing gid needs them.
pub(crate) fn resolve(spec: &str) -> Result<Identity, String> {
    resolve_with(spec, &|path| std::fs::read_to_string(path).ok())
}

/// [`resolve`] with the file reader injected (for tests).
fn resolve_with(spec: &str, read: &dyn Fn(&str) -> Option<String>) -> Result<Identity, String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() || group == Some("") {
        return Err(format!("invalid user {spec:?}: expected uid[:gid] or name[:group]"));
    }
    let numeric_uid = user.parse::<u32>().ok();
    let numeric_gid = group.and_then(|g| g.parse::<u32>().ok());
    let passwd = if numeric_uid.is_some() && numeric_gid.is_some() { None } else { read("/etc/passwd") };
    let entry = passwd.as_deref().and_then(|text| {
        passwd_entries(text).find(|e| match numeric_uid {
            Some(uid) => e.uid == uid,
            None => e.name == user,
        })
    });
    let uid = match (numeric_uid, &entry) {
        (Some(uid), _) => uid,
        (None, Some(e)) => e.uid,
        (None, None) => return Err(format!("user {user:?} not found in /etc/passwd")),
    };
    let gid = match (group, numeric_gid) {
        (_, Some(gid)) => gid,
        (Some(name), None) => lookup_group(name, read)?,
        // Like Docker: a uid without a passwd entry gets gid 0.
        (None, None) => entry.as_ref().map_or(0, |e| e.gid),
    };
    Ok(Identity { uid, gid, home: entry.map(|e| e.home.to_owned()) })
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

/// The well-formed lines of a passwd file (`name:pw:uid:gid:gecos:home:shell`).
fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 6 || line.starts_with('#') {
            return None;
        }
        Some(PasswdEntry { name: f[0], uid: f[2].parse().ok()?, gid: f[3].parse().ok()?, home: f[5] })
    })
}

/// The gid of group `name` from /etc/group (`name:pw:gid:members`).
fn lookup_group(name: &str, read: &dyn Fn(&str) -> Option<String>) -> Result<u32, String> {
    let text = read("/etc/group").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            (f.len() >= 3 && f[0] == name).then(|| f[2].parse::<u32>().ok())?
        })
        .next()
        .ok_or_else(|| format!("group {name:?} not found in /etc/group"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          # a comment\n\
                          broken line\n\
                          app:x:1000:1001:App:/home/app:/bin/sh\n\
                          nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:app\nnogroup:x:65534:\n";

    fn files(path: &str) -> Option<String> {
        match path {
            "/etc/passwd" => Some(PASSWD.into()),
            "/etc/group" => Some(GROUP.into()),
            _ => None,
        }
    }

    fn no_files(path: &str) -> Option<String> {
        panic!("{path} must not be read for a fully numeric spec")
    }

    #[test]
    fn names_and_numbers_resolve() {
        let app = resolve_with("app", &files).expect("app");
        assert_eq!((app.uid, app.gid, app.home.as_deref()), (1000, 1001, Some("/home/app")));
        let app_staff = resolve_with("app:staff", &files).expect("app:staff");
        assert_eq!((app_staff.uid, app_staff.gid), (1000, 50));
        let by_uid = resolve_with("1000", &files).expect("1000");
        assert_eq!((by_uid.gid, by_uid.home.as_deref()), (1001, Some("/home/app")));
        let unknown_uid = resolve_with("4242", &files).expect("4242");
        assert_eq!((unknown_uid.uid, unknown_uid.gid, unknown_uid.home), (4242, 0, None));
        let numeric = resolve_with("7:8", &no_files).expect("7:8");
        assert_eq!((numeric.uid, numeric.gid), (7, 8));
        let mixed = resolve_with("nobody:50", &files).expect("nobody:50");
        assert_eq!((mixed.uid, mixed.gid), (65534, 50));
    }

    #[test]
    fn bad_specs_are_errors() {
        for spec in ["", ":0", "0:", "ghost", "app:ghosts"] {
            let err = resolve_with(spec, &files).expect_err(spec);
            assert!(!err.is_empty(), "{spec}");
        }
        assert!(resolve_with("app", &|_| None).is_err(), "no passwd file");
    }
}
