pub mod about;
pub mod home;
