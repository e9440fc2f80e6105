pub mod about;
pub mod home;
pub mod search;
