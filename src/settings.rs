//! Settings declared once: [`settings!`] turns a list of settings into a serde struct (TOML keys
//! are the field names, each with its default), a clap flags struct (each flag an `Option`, so
//! that an absent flag keeps the file's value) and the merge of the two. `--help` shows each
//! default.
//!
//! The server's settings (src/config.rs) and each policy's own (src/policy/<name>.rs) are
//! declared with it; this module depends on nothing else in the crate, so both can.

/// A group of settings declared with [`settings!`].
pub trait Settings: Default {
    /// The group's flags, each optional.
    type Flags;
    /// Overrides every setting that a flag gave.
    fn apply(&mut self, flags: Self::Flags);
}

/// A setting out of the range its type allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub field: &'static str,
    pub reason: &'static str,
}

#[doc(hidden)]
pub fn parse_default<T: std::str::FromStr>(name: &str, text: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    text.parse().unwrap_or_else(|e| panic!("default of {name} ({text:?}) does not parse: {e:?}"))
}

/// Parses a bool flag value (`--flag`, `--flag true`, `--flag false`).
#[doc(hidden)]
pub fn bool_value(s: &str) -> Result<bool, String> {
    match s {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("expected true or false, got {s:?}")),
    }
}

/// Declares a group of settings: the settings struct, its flags struct and [`Settings`].
///
/// Each setting is `name: kind Type = "default", "help";` where kind is `val` (a value),
/// `flag` (a bool that `--name` alone turns on), `switch` (a value that `--name` alone sets to
/// what `"true"` parses to) or `opt` (an `Option`; the default text is only shown). Sections start with their `--help` heading; a section may open with
/// `..field: Group;`, another group flattened in there (its settings keep their own headings).
macro_rules! settings {
    (
        $(#[$cmeta:meta])*
        pub struct $cfg:ident;
        $(#[$fmeta:meta])*
        pub struct $flags:ident;
        $(
            [$heading:literal]
            $(.. $group:ident : $gty:ty;)?
            $(
                $name:ident : $kind:ident $ty:ty = $default:literal, $help:expr;
            )*
        )*
    ) => {
        #[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
        #[serde(default)]
        $(#[$cmeta])*
        pub struct $cfg {
            $(
                $( #[serde(flatten)] pub $group: $gty, )?
                $( #[doc = $help] pub $name: $crate::settings::settings!(@field $kind $ty), )*
            )*
        }

        impl Default for $cfg {
            fn default() -> Self {
                Self {
                    $(
                        $( $group: Default::default(), )?
                        $( $name: $crate::settings::settings!(@default $kind $ty, $name, $default), )*
                    )*
                }
            }
        }

        #[derive(clap::Args, Clone, Debug, Default)]
        $(#[$fmeta])*
        pub struct $flags {
            $(
                $(
                    #[command(flatten)]
                    pub $group: <$gty as $crate::settings::Settings>::Flags,
                )?
                $(
                    #[arg(
                        long,
                        help_heading = $heading,
                        help = concat!($help, " [default: ", $default, "]"),
                        num_args = $crate::settings::settings!(@nargs $kind),
                        default_missing_value = $crate::settings::settings!(@missing $kind),
                        value_parser = $crate::settings::settings!(@parser $kind $ty),
                    )]
                    pub $name: Option<$crate::settings::settings!(@inner $kind $ty)>,
                )*
            )*
        }

        impl $crate::settings::Settings for $cfg {
            type Flags = $flags;
            #[allow(unused_variables)] // a group of no settings
            fn apply(&mut self, flags: $flags) {
                $(
                    $( $crate::settings::Settings::apply(&mut self.$group, flags.$group); )?
                    $(
                        if let Some(v) = flags.$name {
                            self.$name = $crate::settings::settings!(@wrap $kind v);
                        }
                    )*
                )*
            }
        }
    };

    (@field val $ty:ty) => { $ty };
    (@field flag $ty:ty) => { bool };
    (@field opt $ty:ty) => { Option<$ty> };
    (@field switch $ty:ty) => { $ty };

    (@inner val $ty:ty) => { $ty };
    (@inner flag $ty:ty) => { bool };
    (@inner opt $ty:ty) => { $ty };
    (@inner switch $ty:ty) => { $ty };

    (@default val $ty:ty, $name:ident, $d:literal) => {
        $crate::settings::parse_default::<$ty>(stringify!($name), $d)
    };
    (@default flag $ty:ty, $name:ident, $d:literal) => {
        $crate::settings::parse_default::<bool>(stringify!($name), $d)
    };
    (@default opt $ty:ty, $name:ident, $d:literal) => { None };
    (@default switch $ty:ty, $name:ident, $d:literal) => {
        $crate::settings::parse_default::<$ty>(stringify!($name), $d)
    };

    (@nargs flag) => { 0..=1 };
    (@nargs switch) => { 0..=1 };
    (@nargs $k:ident) => { 1 };
    (@missing flag) => { Some("true") };
    (@missing switch) => { Some("true") };
    (@missing $k:ident) => { None::<&'static str> };
    (@parser flag $ty:ty) => { $crate::settings::bool_value };
    (@parser $k:ident $ty:ty) => { clap::value_parser!($ty) };

    (@wrap opt $v:ident) => { Some($v) };
    (@wrap $k:ident $v:ident) => { $v };
}
pub(crate) use settings;
