pub mod about;
pub mod classes;
pub mod compare;
pub mod home;
pub mod neuron;
pub mod search;
pub mod steer;
