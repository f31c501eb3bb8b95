//! `run --user NAME|UID`: the account the command runs as.

use std::{
    ffi::{CStr, CString},
    io, mem, ptr,
};

/// Largest number of supplementary groups looked up for a user.
const MAX_GROUPS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("unknown user `{0}`; give a user name or a numeric uid that exists on this host")]
    Unknown(String),
    #[error("cannot look up user `{name}`")]
    Lookup { name: String, source: io::Error },
}

/// A user account: ids, supplementary groups and the login environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub groups: Vec<libc::gid_t>,
    pub home: String,
}

impl RunAs {
    /// Looks up `spec`, a user name or a numeric uid, in the user database.
    pub fn lookup(spec: &str) -> Result<Self, UserError> {
        let unknown = || UserError::Unknown(spec.to_owned());
        let mut buf = vec![0u8; 16 * 1024];
        // SAFETY: `passwd` is plain data; all-zero is a valid value to be filled in.
        let mut pwd: libc::passwd = unsafe { mem::zeroed() };
        let mut found: *mut libc::passwd = ptr::null_mut();
        let status = match spec.parse::<libc::uid_t>() {
            // SAFETY: every pointer is valid for the call, and `buf` outlives `pwd`'s use.
            Ok(uid) => unsafe {
                libc::getpwuid_r(
                    uid,
                    &mut pwd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    &mut found,
                )
            },
            Err(_) => {
                let name = CString::new(spec).map_err(|_| unknown())?;
                // SAFETY: as above; `name` is NUL-terminated.
                unsafe {
                    libc::getpwnam_r(
                        name.as_ptr(),
                        &mut pwd,
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        &mut found,
                    )
                }
            }
        };
        if status != 0 {
            return Err(UserError::Lookup {
                name: spec.to_owned(),
                source: io::Error::from_raw_os_error(status),
            });
        }
        if found.is_null() {
            return Err(unknown());
        }
        // SAFETY: on success the strings point into `buf`, which is still alive.
        let (name, home) = unsafe { (CStr::from_ptr(pwd.pw_name), CStr::from_ptr(pwd.pw_dir)) };
        let name = name.to_string_lossy().into_owned();
        let groups = supplementary_groups(&name, pwd.pw_gid);
        Ok(Self {
            home: home.to_string_lossy().into_owned(),
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
            groups,
            name,
        })
    }

    /// Returns the environment variables that name this user: `HOME`, `USER`, `LOGNAME`.
    pub fn env(&self) -> Vec<(&'static str, &str)> {
        vec![
            ("HOME", self.home.as_str()),
            ("USER", self.name.as_str()),
            ("LOGNAME", self.name.as_str()),
        ]
    }
}

/// Returns the groups of user `name`, its primary group `gid` included.
fn supplementary_groups(name: &str, gid: libc::gid_t) -> Vec<libc::gid_t> {
    let Ok(c_name) = CString::new(name) else {
        return vec![gid];
    };
    let mut groups = vec![0 as libc::gid_t; MAX_GROUPS];
    let mut count = MAX_GROUPS as libc::c_int;
    // SAFETY: `groups` has room for `count` entries and `c_name` is NUL-terminated.
    let status =
        unsafe { libc::getgrouplist(c_name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
    if status < 0 {
        log::warn!("user {name} is in more than {MAX_GROUPS} groups; using the first {MAX_GROUPS}");
        count = MAX_GROUPS as libc::c_int;
    }
    groups.truncate(count.max(0) as usize);
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_by_name_and_uid() {
        let by_name = RunAs::lookup("root").expect("root exists");
        assert_eq!((by_name.uid, by_name.gid), (0, 0));
        assert_eq!(RunAs::lookup("0").expect("uid 0").name, "root");
        assert!(by_name.groups.contains(&0));
    }

    #[test]
    fn unknown_user_is_rejected() {
        let err = RunAs::lookup("bypass-no-such-user").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown user `bypass-no-such-user`; give a user name or a numeric uid that exists \
             on this host"
        );
        assert!(matches!(
            RunAs::lookup("4000000123"),
            Err(UserError::Unknown(_))
        ));
    }
}
