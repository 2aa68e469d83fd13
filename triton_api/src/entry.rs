//! The `TRITONBACKEND_*` entry points, generic over a `Backend` implementation, and the
//! `declare_backend!` macro that exports them with C names from the backend's cdylib.
//!
//! Every entry point runs its body inside `catch_unwind`: a panic becomes a
//! `TRITONSERVER_ERROR_INTERNAL` error, never an unwind across the FFI boundary. Model and
//! instance states are `Box`es stored with `Model(Instance)SetState` and reclaimed in the
//! matching finalize. `Execute` takes ownership of every request and always returns success, so
//! per-request failures must be reported by the backend as error responses.

use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::error::check;
use crate::{InstanceGroupKind, InstanceHandle, Model, Request, TritonError, api, sys};

/// What a Triton backend implements. All methods run on Triton's threads inside `catch_unwind`.
pub trait Backend: 'static {
    /// Per-model state (created in ModelInitialize, dropped after ModelFinalize).
    type Model: Send + Sync + 'static;
    /// Per-instance state.
    type Instance: Send + Sync + 'static;

    /// After the Triton API was resolved and its version checked.
    fn initialize() -> Result<(), TritonError> {
        Ok(())
    }

    /// The instance group a model gets when its config names none: (kind, count).
    fn preferred_instance_group() -> Option<(InstanceGroupKind, u64)> {
        None
    }

    /// Builds the per-model state when Triton loads `model` (TRITONBACKEND_ModelInitialize); an
    /// error fails the load with its message. `model` is only valid during this call.
    fn model_initialize(model: &Model<'_>) -> Result<Self::Model, TritonError>;

    /// Consumes the model state (e.g. to shut an engine down and join its threads).
    fn model_finalize(state: Self::Model) {
        drop(state);
    }

    /// Builds the state of one model instance (TRITONBACKEND_ModelInstanceInitialize); `instance`
    /// stays valid until `instance_finalize`.
    fn instance_initialize(
        model: &Self::Model,
        instance: InstanceHandle,
    ) -> Result<Self::Instance, TritonError>;

    /// Must stop all use of `instance` before returning.
    fn instance_finalize(model: &Self::Model, state: Self::Instance) {
        let _ = model;
        drop(state);
    }

    /// Owns `requests`: each must get exactly one final response and be released.
    fn execute(
        model: &Self::Model,
        instance: &Self::Instance,
        handle: InstanceHandle,
        requests: Vec<Request>,
    );
}

fn guarded(
    what: &str,
    f: impl FnOnce() -> Result<(), TritonError>,
) -> *mut sys::TRITONSERVER_Error {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => std::ptr::null_mut(),
        Ok(Err(e)) => {
            crate::log::error(&format!("{what} failed: {e}"));
            e.into_raw()
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            let e = TritonError::internal(format!("{what} panicked: {msg}"));
            crate::log::error(e.message());
            e.into_raw()
        }
    }
}

/// # Safety
/// Called by Triton with a valid backend handle.
pub unsafe fn initialize<B: Backend>(
    _backend: *mut sys::TRITONBACKEND_Backend,
) -> *mut sys::TRITONSERVER_Error {
    guarded("TRITONBACKEND_Initialize", || {
        crate::load()?;
        B::initialize()
    })
}

/// # Safety
/// Called by Triton with a valid backend handle.
pub unsafe fn finalize<B: Backend>(
    _backend: *mut sys::TRITONBACKEND_Backend,
) -> *mut sys::TRITONSERVER_Error {
    guarded("TRITONBACKEND_Finalize", || Ok(()))
}

/// # Safety
/// Called by Triton with valid backend and attribute handles.
pub unsafe fn get_backend_attribute<B: Backend>(
    _backend: *mut sys::TRITONBACKEND_Backend,
    attr: *mut sys::TRITONBACKEND_BackendAttribute,
) -> *mut sys::TRITONSERVER_Error {
    guarded(
        "TRITONBACKEND_GetBackendAttribute",
        || match B::preferred_instance_group() {
            Some((kind, count)) => crate::handles::add_preferred_instance_group(attr, kind, count),
            None => Ok(()),
        },
    )
}

/// # Safety
/// Called by Triton with a valid model handle.
pub unsafe fn model_initialize<B: Backend>(
    model: *mut sys::TRITONBACKEND_Model,
) -> *mut sys::TRITONSERVER_Error {
    guarded("TRITONBACKEND_ModelInitialize", || {
        // SAFETY: Triton passes a model valid for this call.
        let m = unsafe { Model::from_raw(model) };
        let state = Box::new(B::model_initialize(&m)?);
        let api = api()?;
        let raw = Box::into_raw(state);
        // SAFETY: live model; the state pointer is reclaimed in model_finalize.
        if let Err(e) = unsafe {
            check(
                api,
                api.TRITONBACKEND_ModelSetState(model, raw.cast::<c_void>()),
            )
        } {
            // SAFETY: `raw` came from Box::into_raw above and was not stored.
            B::model_finalize(*unsafe { Box::from_raw(raw) });
            return Err(e);
        }
        Ok(())
    })
}

/// # Safety
/// Called by Triton with a valid model handle whose state was set by `model_initialize::<B>`.
pub unsafe fn model_finalize<B: Backend>(
    model: *mut sys::TRITONBACKEND_Model,
) -> *mut sys::TRITONSERVER_Error {
    guarded("TRITONBACKEND_ModelFinalize", || {
        let api = api()?;
        let mut state = std::ptr::null_mut();
        // SAFETY: live model, valid out-pointer.
        unsafe { check(api, api.TRITONBACKEND_ModelState(model, &mut state))? };
        if state.is_null() {
            return Ok(());
        }
        // SAFETY: the state was stored by model_initialize::<B> as Box<B::Model>; finalize runs
        // once, after every instance was finalized.
        let state = unsafe { Box::from_raw(state.cast::<B::Model>()) };
        // SAFETY: clear the pointer so nothing can reach the freed state.
        let _ = unsafe {
            check(
                api,
                api.TRITONBACKEND_ModelSetState(model, std::ptr::null_mut()),
            )
        };
        B::model_finalize(*state);
        Ok(())
    })
}

/// The model state of an instance's model.
///
/// # Safety
/// `instance` must be live and its model's state set by `model_initialize::<B>`.
unsafe fn model_state<'a, B: Backend>(
    instance: *mut sys::TRITONBACKEND_ModelInstance,
) -> Result<&'a B::Model, TritonError> {
    let api = api()?;
    let mut model = std::ptr::null_mut();
    let mut state = std::ptr::null_mut();
    // SAFETY: live instance; valid out-pointers.
    unsafe {
        check(
            api,
            api.TRITONBACKEND_ModelInstanceModel(instance, &mut model),
        )?;
        check(api, api.TRITONBACKEND_ModelState(model, &mut state))?;
    }
    if state.is_null() {
        return Err(TritonError::internal(
            "the model has no ferrum state (ModelInitialize did not run)",
        ));
    }
    // SAFETY: set by model_initialize::<B>; the model outlives its instances.
    Ok(unsafe { &*state.cast::<B::Model>() })
}

/// # Safety
/// Called by Triton with a valid instance handle.
pub unsafe fn instance_initialize<B: Backend>(
    instance: *mut sys::TRITONBACKEND_ModelInstance,
) -> *mut sys::TRITONSERVER_Error {
    guarded("TRITONBACKEND_ModelInstanceInitialize", || {
        // SAFETY: live instance whose model was initialized by us.
        let model = unsafe { model_state::<B>(instance)? };
        // SAFETY: valid until ModelInstanceFinalize.
        let handle = unsafe { InstanceHandle::from_raw(instance) };
        let state = Box::new(B::instance_initialize(model, handle)?);
        let api = api()?;
        let raw = Box::into_raw(state);
        // SAFETY: live instance; the pointer is reclaimed in instance_finalize.
        if let Err(e) = unsafe {
            check(
                api,
                api.TRITONBACKEND_ModelInstanceSetState(instance, raw.cast()),
            )
        } {
            // SAFETY: `raw` came from Box::into_raw above and was not stored.
            B::instance_finalize(model, *unsafe { Box::from_raw(raw) });
            return Err(e);
        }
        Ok(())
    })
}

/// # Safety
/// Called by Triton with a valid instance handle.
pub unsafe fn instance_finalize<B: Backend>(
    instance: *mut sys::TRITONBACKEND_ModelInstance,
) -> *mut sys::TRITONSERVER_Error {
    guarded("TRITONBACKEND_ModelInstanceFinalize", || {
        let api = api()?;
        let mut state = std::ptr::null_mut();
        // SAFETY: live instance, valid out-pointer.
        unsafe {
            check(
                api,
                api.TRITONBACKEND_ModelInstanceState(instance, &mut state),
            )?
        };
        if state.is_null() {
            return Ok(());
        }
        // SAFETY: live instance whose model was initialized by us.
        let model = unsafe { model_state::<B>(instance)? };
        // SAFETY: stored by instance_initialize::<B>; finalize runs once.
        let state = unsafe { Box::from_raw(state.cast::<B::Instance>()) };
        // SAFETY: clear the pointer so nothing can reach the freed state.
        let _ = unsafe {
            check(
                api,
                api.TRITONBACKEND_ModelInstanceSetState(instance, std::ptr::null_mut()),
            )
        };
        B::instance_finalize(model, *state);
        Ok(())
    })
}

/// # Safety
/// Called by Triton with a valid instance and `request_count` valid request pointers.
pub unsafe fn instance_execute<B: Backend>(
    instance: *mut sys::TRITONBACKEND_ModelInstance,
    requests: *mut *mut sys::TRITONBACKEND_Request,
    request_count: u32,
) -> *mut sys::TRITONSERVER_Error {
    // Copy the request pointers out first: the array is Triton's again once we return. From
    // here on we own the requests (we always return success), so each one is wrapped in an
    // owned `Request` that is released even if the backend panics.
    let raw: Vec<*mut sys::TRITONBACKEND_Request> = if requests.is_null() || request_count == 0 {
        Vec::new()
    } else {
        // SAFETY: Triton passes `request_count` request pointers at `requests`.
        unsafe { std::slice::from_raw_parts(requests, request_count as usize) }.to_vec()
    };
    // SAFETY: each pointer is a request Triton hands to this Execute call.
    let owned: Vec<Request> = raw
        .into_iter()
        .map(|r| unsafe { Request::from_raw(r) })
        .collect();
    let mut owned = Some(owned);
    let err = guarded("TRITONBACKEND_ModelInstanceExecute", || {
        // SAFETY: live instance whose model was initialized by us.
        let model = unsafe { model_state::<B>(instance)? };
        let api = api()?;
        let mut state = std::ptr::null_mut();
        // SAFETY: live instance, valid out-pointer.
        unsafe {
            check(
                api,
                api.TRITONBACKEND_ModelInstanceState(instance, &mut state),
            )?
        };
        if state.is_null() {
            return Err(TritonError::internal("the instance has no ferrum state"));
        }
        // SAFETY: stored by instance_initialize::<B>; Triton does not finalize an instance
        // while it executes.
        let inst = unsafe { &*state.cast::<B::Instance>() };
        // SAFETY: valid for this call and until finalize.
        let handle = unsafe { InstanceHandle::from_raw(instance) };
        B::execute(model, inst, handle, owned.take().unwrap_or_default());
        Ok(())
    });
    if let Some(requests) = owned {
        // The backend never saw these requests: answer each with the error and release it.
        let e = TritonError::internal(
            "the ferrum backend could not process the request (see the server log)",
        );
        for request in requests {
            request.respond_error(&e);
        }
    }
    if !err.is_null() {
        // The requests were consumed (and released on drop); Triton must not touch them again,
        // so the error is logged (by `guarded`) and success returned.
        if let Ok(api) = api() {
            // SAFETY: `err` was created by `guarded` and is ours.
            unsafe { api.TRITONSERVER_ErrorDelete(err) };
        }
    }
    std::ptr::null_mut()
}

/// Exports the `TRITONBACKEND_*` entry points for a type implementing `Backend`. Use once, in
/// the crate that builds the backend's cdylib.
#[macro_export]
macro_rules! declare_backend {
    ($backend:ty) => {
        /// Triton calls this once when it loads the backend library: resolves the Triton API,
        /// checks its version, then runs `Backend::initialize`.
        ///
        /// # Safety
        /// Only Triton calls this, with a valid backend handle.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn TRITONBACKEND_Initialize(
            backend: *mut $crate::sys::TRITONBACKEND_Backend,
        ) -> *mut $crate::sys::TRITONSERVER_Error {
            // SAFETY: Triton (the only caller) calls this with a valid backend handle.
            unsafe { $crate::entry::initialize::<$backend>(backend) }
        }

        /// Triton calls this when it unloads the backend library (after every model is
        /// finalized); nothing to do.
        ///
        /// # Safety
        /// Only Triton calls this, with a valid backend handle.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn TRITONBACKEND_Finalize(
            backend: *mut $crate::sys::TRITONBACKEND_Backend,
        ) -> *mut $crate::sys::TRITONSERVER_Error {
            // SAFETY: Triton (the only caller) calls this with a valid backend handle.
            unsafe { $crate::entry::finalize::<$backend>(backend) }
        }

        /// Triton asks for the backend's attributes: reports `Backend::preferred_instance_group`,
        /// the instance group a model gets when its config names none.
        ///
        /// # Safety
        /// Only Triton calls this, with valid backend and attribute handles.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn TRITONBACKEND_GetBackendAttribute(
            backend: *mut $crate::sys::TRITONBACKEND_Backend,
            attr: *mut $crate::sys::TRITONBACKEND_BackendAttribute,
        ) -> *mut $crate::sys::TRITONSERVER_Error {
            // SAFETY: Triton (the only caller) calls this with valid handles.
            unsafe { $crate::entry::get_backend_attribute::<$backend>(backend, attr) }
        }

        /// Triton loads a model: runs `Backend::model_initialize` and stores the model state it
        /// returns; its error fails the load.
        ///
        /// # Safety
        /// Only Triton calls this, with a valid model handle.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn TRITONBACKEND_ModelInitialize(
            model: *mut $crate::sys::TRITONBACKEND_Model,
        ) -> *mut $crate::sys::TRITONSERVER_Error {
            // SAFETY: Triton (the only caller) calls this with a valid model handle.
            unsafe { $crate::entry::model_initialize::<$backend>(model) }
        }

        /// Triton unloads a model (after its instances are finalized): takes back the model
        /// state and hands it to `Backend::model_finalize`.
        ///
        /// # Safety
        /// Only Triton calls this, with a valid model handle whose state ModelInitialize set.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn TRITONBACKEND_ModelFinalize(
            model: *mut $crate::sys::TRITONBACKEND_Model,
        ) -> *mut $crate::sys::TRITONSERVER_Error {
            // SAFETY: Triton (the only caller) calls this with a valid model handle.
            unsafe { $crate::entry::model_finalize::<$backend>(model) }
        }

        /// Triton creates a model instance: runs `Backend::instance_initialize` and stores the
        /// instance state it returns.
        ///
        /// # Safety
        /// Only Triton calls this, with a valid instance handle of an initialized model.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceInitialize(
            instance: *mut $crate::sys::TRITONBACKEND_ModelInstance,
        ) -> *mut $crate::sys::TRITONSERVER_Error {
            // SAFETY: Triton (the only caller) calls this with a valid instance handle.
            unsafe { $crate::entry::instance_initialize::<$backend>(instance) }
        }

        /// Triton removes a model instance: takes back its state and hands it to
        /// `Backend::instance_finalize`, which must stop every use of the instance.
        ///
        /// # Safety
        /// Only Triton calls this, with a valid instance handle whose state was set.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceFinalize(
            instance: *mut $crate::sys::TRITONBACKEND_ModelInstance,
        ) -> *mut $crate::sys::TRITONSERVER_Error {
            // SAFETY: Triton (the only caller) calls this with a valid instance handle.
            unsafe { $crate::entry::instance_finalize::<$backend>(instance) }
        }

        /// Triton hands an instance a batch of requests: they are owned from here on and go to
        /// `Backend::execute`; always returns success (per-request failures are error
        /// responses).
        ///
        /// # Safety
        /// Only Triton calls this, with a valid instance and `request_count` valid request
        /// pointers.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceExecute(
            instance: *mut $crate::sys::TRITONBACKEND_ModelInstance,
            requests: *mut *mut $crate::sys::TRITONBACKEND_Request,
            request_count: u32,
        ) -> *mut $crate::sys::TRITONSERVER_Error {
            // SAFETY: Triton (the only caller) calls this with a valid instance and `request_count` requests.
            unsafe {
                $crate::entry::instance_execute::<$backend>(instance, requests, request_count)
            }
        }
    };
}
