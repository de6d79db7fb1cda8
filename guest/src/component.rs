//! The reference component: [`Forwarder`](crate::Forwarder) exported through
//! the guest SDK (contract 1.1, and 1.0 for older hosts).

ksm_guest_sdk::export!(crate::Forwarder);
