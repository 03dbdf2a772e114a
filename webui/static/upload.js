// Image queries without a file dialog: a dropped or pasted image is put into the form's file input
// and the form is submitted as ordinary multipart, so the server sees exactly what a chosen file gives.
(function () {
  "use strict";
  var form = document.querySelector("form[data-image-form]");
  if (!form) return;
  var input = form.querySelector("input[type=file]");
  var zone = form.querySelector(".dropzone");

  function send(file) {
    if (!file || !/^image\//.test(file.type)) return;
    var transfer = new DataTransfer();
    transfer.items.add(file);
    input.files = transfer.files;
    form.submit();
  }

  input.addEventListener("change", function () {
    if (input.files.length) form.submit();
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
})();
