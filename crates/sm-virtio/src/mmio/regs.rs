//! Register offsets and status bits of virtio-mmio version 2.

/// "virt" in little endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// Transport version (2 = virtio 1.x "modern").
pub const VERSION: u32 = 2;
/// Vendor id reported to the driver ("SMCH").
pub const VENDOR_ID: u32 = 0x4843_4d53;

// The register offsets and status bits are virtio-bindings' (u32 there; the
// transport matches on u64 offsets).
use virtio_bindings::virtio_config as config;
use virtio_bindings::virtio_mmio as mmio;

pub const REG_MAGIC: u64 = mmio::VIRTIO_MMIO_MAGIC_VALUE as u64;
pub const REG_VERSION: u64 = mmio::VIRTIO_MMIO_VERSION as u64;
pub const REG_DEVICE_ID: u64 = mmio::VIRTIO_MMIO_DEVICE_ID as u64;
pub const REG_VENDOR_ID: u64 = mmio::VIRTIO_MMIO_VENDOR_ID as u64;
pub const REG_DEVICE_FEATURES: u64 = mmio::VIRTIO_MMIO_DEVICE_FEATURES as u64;
pub const REG_DEVICE_FEATURES_SEL: u64 = mmio::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
pub const REG_DRIVER_FEATURES: u64 = mmio::VIRTIO_MMIO_DRIVER_FEATURES as u64;
pub const REG_DRIVER_FEATURES_SEL: u64 = mmio::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
pub const REG_QUEUE_SEL: u64 = mmio::VIRTIO_MMIO_QUEUE_SEL as u64;
pub const REG_QUEUE_NUM_MAX: u64 = mmio::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
pub const REG_QUEUE_NUM: u64 = mmio::VIRTIO_MMIO_QUEUE_NUM as u64;
pub const REG_QUEUE_READY: u64 = mmio::VIRTIO_MMIO_QUEUE_READY as u64;
pub const REG_QUEUE_NOTIFY: u64 = mmio::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
pub const REG_INTERRUPT_STATUS: u64 = mmio::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
pub const REG_INTERRUPT_ACK: u64 = mmio::VIRTIO_MMIO_INTERRUPT_ACK as u64;
pub const REG_STATUS: u64 = mmio::VIRTIO_MMIO_STATUS as u64;
pub const REG_QUEUE_DESC_LOW: u64 = mmio::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
pub const REG_QUEUE_DESC_HIGH: u64 = mmio::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
/// The driver (avail) ring.
pub const REG_QUEUE_DRIVER_LOW: u64 = mmio::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
pub const REG_QUEUE_DRIVER_HIGH: u64 = mmio::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
/// The device (used) ring.
pub const REG_QUEUE_DEVICE_LOW: u64 = mmio::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
pub const REG_QUEUE_DEVICE_HIGH: u64 = mmio::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
pub const REG_SHM_SEL: u64 = mmio::VIRTIO_MMIO_SHM_SEL as u64;
pub const REG_SHM_LEN_LOW: u64 = mmio::VIRTIO_MMIO_SHM_LEN_LOW as u64;
pub const REG_SHM_LEN_HIGH: u64 = mmio::VIRTIO_MMIO_SHM_LEN_HIGH as u64;
pub const REG_SHM_BASE_LOW: u64 = mmio::VIRTIO_MMIO_SHM_BASE_LOW as u64;
pub const REG_SHM_BASE_HIGH: u64 = mmio::VIRTIO_MMIO_SHM_BASE_HIGH as u64;
pub const REG_CONFIG_GENERATION: u64 = mmio::VIRTIO_MMIO_CONFIG_GENERATION as u64;
/// Device configuration space starts here.
pub const REG_CONFIG: u64 = mmio::VIRTIO_MMIO_CONFIG as u64;

pub const STATUS_ACKNOWLEDGE: u32 = config::VIRTIO_CONFIG_S_ACKNOWLEDGE;
pub const STATUS_DRIVER: u32 = config::VIRTIO_CONFIG_S_DRIVER;
pub const STATUS_DRIVER_OK: u32 = config::VIRTIO_CONFIG_S_DRIVER_OK;
pub const STATUS_FEATURES_OK: u32 = config::VIRTIO_CONFIG_S_FEATURES_OK;
pub const STATUS_DEVICE_NEEDS_RESET: u32 = config::VIRTIO_CONFIG_S_NEEDS_RESET;
pub const STATUS_FAILED: u32 = config::VIRTIO_CONFIG_S_FAILED;
