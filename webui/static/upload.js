// Image queries without a file dialog: a dropped or pasted image is put into the form's file input
// and the form is submitted as ordinary multipart, so the server sees exactly what a chosen file gives.
// At once the patch is shown with its size, the form says "embedding..." and cannot be sent twice, and
// the filters chosen on the page (the one filter state shared with text search) go with the image.
(function () {
  "use strict";
  var form = document.querySelector("form[data-image-form]");
  if (!form) return;
  var input = form.querySelector("input[type=file]");
  var zone = form.querySelector(".dropzone");
  var status = form.querySelector(".upload-status");
  var preview = form.querySelector("img.upload-preview");
  var limit = parseInt(form.dataset.maxBytes || "0", 10);

  function megabytes(bytes) {
    return (bytes / 1048576).toFixed(bytes < 1048576 ? 2 : 1) + " MB";
  }

  // The filter fields of the page's search form are the filter state: copy them in as hidden fields.
  function copyFilters() {
    var source = document.querySelector("form[role=search]");
    if (!source) return;
    Array.prototype.forEach.call(form.querySelectorAll("input[type=hidden][data-filter]"), function (field) {
      field.remove();
    });
    Array.prototype.forEach.call(source.querySelectorAll("[data-filter]"), function (field) {
      if (!field.name || field.value === "") return;
      var hidden = document.createElement("input");
      hidden.type = "hidden";
      hidden.name = field.name;
      hidden.value = field.value;
      hidden.dataset.filter = "1";
      form.appendChild(hidden);
    });
  }

  function busy(file) {
    status.textContent = "";
    if (limit && file.size > limit) {
      status.textContent = file.name + " is " + megabytes(file.size) + ": over the " + megabytes(limit) + " limit.";
      status.classList.add("bad");
      return false;
    }
    status.classList.remove("bad");
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
    preview.onload = function () {
      status.textContent = file.name + " · " + preview.naturalWidth + " × " + preview.naturalHeight + " px · " +
        megabytes(file.size) + " · embedding…";
    };
    status.textContent = file.name + " · " + megabytes(file.size) + " · embedding…";
    form.classList.add("busy");
    form.setAttribute("aria-busy", "true");
    Array.prototype.forEach.call(form.querySelectorAll("button, select"), function (control) {
      control.disabled = true;
    });
    return true;
  }

  function submit(file) {
    copyFilters();
    // The form data is taken when submit() runs, so the controls can be disabled right after.
    if (busy(file)) form.submit();
  }

  function send(file) {
    if (!file || !/^image\//.test(file.type)) return;
    var transfer = new DataTransfer();
    transfer.items.add(file);
    input.files = transfer.files;
    submit(file);
  }

  input.addEventListener("change", function () {
    if (input.files.length) submit(input.files[0]);
  });
  form.addEventListener("submit", function (event) {
    if (!input.files.length) return;
    event.preventDefault();
    submit(input.files[0]);
  });

  ["dragenter", "dragover"].forEach(function (name) {
    zone.addEventListener(name, function (event) {
      event.preventDefault();
      zone.classList.add("over");
    });
  });
  ["dragleave", "drop"].forEach(function (name) {
    zone.addEventListener(name, function () {
      zone.classList.remove("over");
    });
  });
  zone.addEventListener("drop", function (event) {
    event.preventDefault();
    send(event.dataTransfer.files[0]);
  });

  // Paste works anywhere on the page, except while typing in a text field.
  document.addEventListener("paste", function (event) {
    var target = event.target;
    if (target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA")) return;
    var items = (event.clipboardData && event.clipboardData.items) || [];
    for (var i = 0; i < items.length; i++) {
      if (items[i].kind === "file" && /^image\//.test(items[i].type)) {
        event.preventDefault();
        send(items[i].getAsFile());
        return;
      }
    }
  });

  // Back from the results: the page may come from the cache with the form still marked busy.
  window.addEventListener("pageshow", function () {
    form.classList.remove("busy");
    form.removeAttribute("aria-busy");
    Array.prototype.forEach.call(form.querySelectorAll("button, select"), function (control) {
      control.disabled = false;
    });
  });
})();
